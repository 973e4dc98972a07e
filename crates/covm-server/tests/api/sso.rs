//! Single sign-on (issue 16): a user of a real OpenID Connect provider the test starts on loopback
//! (`idp.rs`) signs in through the browser flow (PKCE) and the device flow, lands in the covm group
//! its IdP group maps to, gets exactly that group's grants, and follows the IdP's groups at the next
//! sign-in; a local user is never taken over.

use std::collections::BTreeMap;

use covm_client::Client;
use covm_server::app::sso::OidcConfig;
use covm_types::ErrorCode;
use covm_types::vm::PowerAction;

use crate::common::{TestServer, on_postgres, vm_named};
use crate::idp::{CLIENT_ID, CLIENT_SECRET, TestIdp};

fn config(idp: &TestIdp) -> OidcConfig {
    OidcConfig {
        issuer: idp.issuer.clone(),
        client_id: CLIENT_ID.into(),
        client_secret: covm_server::Hidden(CLIENT_SECRET.into()),
        groups_claim: "groups".into(),
        group_map: BTreeMap::from([("idp-ops".to_owned(), "operators".to_owned())]),
        redirect_url: None,
        disabled_claim: Some("covm_disabled".into()),
    }
}

/// The browser flow as a browser walks it: covm's login sends it to the provider, the user posts the
/// login form there, the provider sends it back to covm's callback, which answers with a session.
async fn browser_sign_in(s: &TestServer, user: &str, password: &str) -> Result<(Client, String), (u16, String)> {
    covm_client::tls::install_provider();
    let b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = b.get(format!("{}/api/v1/sso/login", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let to_idp = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to_idp.contains("code_challenge_method=S256") && to_idp.contains("nonce="), "{to_idp}");
    let r = b.post(&to_idp).form(&[("username", user), ("password", password)]).send().await.unwrap();
    if r.status() != 302 {
        return Err((r.status().as_u16(), r.text().await.unwrap()));
    }
    let back = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(back.starts_with(&format!("{}/api/v1/sso/callback?", s.url)), "{back}");
    let r = b.get(&back).send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    if status != 201 {
        return Err((status, body));
    }
    let t: covm_types::api::SessionToken = serde_json::from_str(&body).unwrap();
    Ok((Client::new(&s.url).with_token(t.token), t.user))
}

#[tokio::test]
async fn a_browser_sign_in_lands_in_the_mapped_group_with_its_grants() {
    if on_postgres() {
        return;
    }
    let idp = TestIdp::start().await;
    idp.user("alice", "alice-pw", &["idp-ops", "idp-other"]);
    let s = TestServer::start_sso(config(&idp)).await;
    // covm's side: a group with VMUser on /ops, and a VM there and one elsewhere.
    s.admin.group_create("operators").await.unwrap();
    s.admin.folder_create("ops", "/").await.unwrap();
    s.admin.vm_create(&covm_types::vm::VmConfig { folder: "/ops".into(), ..vm_named("ops-vm") }).await.unwrap();
    s.admin.vm_create(&vm_named("other-vm")).await.unwrap();
    s.admin.permission_grant("group:operators", "VMUser", "/ops", true).await.unwrap();
    // A wrong password at the provider: no code, no session.
    let e = browser_sign_in(&s, "alice", "nope").await.unwrap_err();
    assert_eq!(e.0, 401);
    let (alice, name) = browser_sign_in(&s, "alice", "alice-pw").await.unwrap();
    assert_eq!(name, "alice");
    let who = alice.whoami(None).await.unwrap();
    assert_eq!(who.groups, vec!["operators".to_owned()], "only the mapped group");
    // Exactly that group's grants: ops-vm (power on), nothing else.
    let vms: Vec<String> = alice.vms(&Default::default()).await.unwrap().items.into_iter().map(|v| v.name).collect();
    assert_eq!(vms, vec!["ops-vm".to_owned()]);
    let t = alice.vm_power("ops-vm", PowerAction::On, None).await.unwrap();
    crate::common::task_done(&s.admin, &t).await;
    assert_eq!(alice.vm("other-vm").await.unwrap_err().status(), Some(404));
    // The user covm made has no password that signs in, and cannot be given one.
    assert!(s.anonymous().login("alice", "alice-pw").await.is_err());
    assert_eq!(alice.user_password_set("alice", "a-local-password-1").await.unwrap_err().status(), Some(409));
    // The IdP takes alice out of idp-ops: at her next sign-in she leaves operators.
    idp.user("alice", "alice-pw", &["idp-other"]);
    let (alice, _) = browser_sign_in(&s, "alice", "alice-pw").await.unwrap();
    assert!(alice.whoami(None).await.unwrap().groups.is_empty());
    assert!(alice.vms(&Default::default()).await.unwrap().items.is_empty());
    // The IdP says alice is disabled: at her next sign-in covm disables her, and her sessions and API
    // tokens end; enabled again, she signs in again.
    let api = alice
        .token_create(&covm_types::api::TokenCreate { name: crate::common::name("ci"), expires_in_s: None })
        .await
        .unwrap();
    let api = Client::new(&s.url).with_token(api.token.unwrap());
    api.whoami(None).await.unwrap();
    idp.disable("alice", true);
    let e = browser_sign_in(&s, "alice", "alice-pw").await.unwrap_err();
    assert_eq!(e.0, 403, "{}", e.1);
    assert!(e.1.contains("user_disabled"), "{}", e.1);
    assert_eq!(alice.whoami(None).await.unwrap_err().status(), Some(401), "her session ended");
    assert_eq!(api.whoami(None).await.unwrap_err().status(), Some(401), "her API token ended");
    assert!(s.admin.users().await.unwrap().iter().any(|u| u.name == "alice" && u.disabled && u.sso));
    idp.disable("alice", false);
    let (alice, _) = browser_sign_in(&s, "alice", "alice-pw").await.unwrap();
    alice.whoami(None).await.unwrap();
    // A callback that covm did not start (a forged or replayed state) is refused.
    covm_client::tls::install_provider();
    let r = reqwest::get(format!("{}/api/v1/sso/callback?code=x&state=forged", s.url)).await.unwrap();
    assert_eq!(r.status(), 401);
    // A local user of the same name is never taken over by an IdP user.
    s.admin.user_create("carol", crate::common::PASSWORD).await.unwrap();
    idp.user("carol", "carol-pw", &["idp-ops"]);
    let e = browser_sign_in(&s, "carol", "carol-pw").await.unwrap_err();
    assert_eq!(e.0, 409, "{}", e.1);
    assert!(
        e.1.contains(&format!("\"{}\"", serde_json::to_value(ErrorCode::AlreadyExists).unwrap().as_str().unwrap()))
    );
}

#[tokio::test]
async fn a_device_sign_in_waits_for_the_user_to_approve() {
    if on_postgres() {
        return;
    }
    let idp = TestIdp::start().await;
    idp.user("dave", "dave-pw", &["idp-ops"]);
    let s = TestServer::start_sso(config(&idp)).await;
    s.admin.group_create("operators").await.unwrap();
    let anon = s.anonymous();
    let start = anon.sso_device_start().await.unwrap();
    assert!(start.verification_uri.starts_with(&idp.issuer));
    let p = anon.sso_device_poll(start.id).await.unwrap();
    assert!(p.pending && p.session.is_none());
    assert_eq!(idp.approve(&start.user_code, "dave", "dave-pw").await, 200);
    let p = anon.sso_device_poll(start.id).await.unwrap();
    let t = p.session.expect("a session once approved");
    let dave = Client::new(&s.url).with_token(t.token);
    assert_eq!(dave.whoami(None).await.unwrap().groups, vec!["operators".to_owned()]);
    // The device sign-in is used up.
    assert_eq!(anon.sso_device_poll(start.id).await.unwrap_err().status(), Some(401));
}

#[tokio::test]
async fn without_a_provider_sso_is_not_found() {
    let s = TestServer::start().await;
    let e = s.anonymous().sso_device_start().await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
}

#[tokio::test]
async fn a_web_ui_sign_in_lands_on_its_page_with_the_session_cookie() {
    if on_postgres() {
        return;
    }
    let idp = TestIdp::start().await;
    idp.user("alice", "alice-pw", &[]);
    let s = TestServer::start_sso(config(&idp)).await;
    covm_client::tls::install_provider();
    let b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let info: serde_json::Value = b.get(format!("{}/api/v1/sso", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["enabled"], true);
    // A page to land on elsewhere than covm's own UI is refused before anything starts.
    for bad in ["https://evil.example/", "//evil.example/x", "vms", "/a b"] {
        let r = b.get(format!("{}/api/v1/sso/login", s.url)).query(&[("next", bad)]).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["field"], "next", "{e}");
    }
    let r =
        b.get(format!("{}/api/v1/sso/login", s.url)).query(&[("next", "/vms/web-1?tab=history")]).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let to_idp = r.headers()["location"].to_str().unwrap().to_owned();
    let r = b.post(&to_idp).form(&[("username", "alice"), ("password", "alice-pw")]).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let back = r.headers()["location"].to_str().unwrap().to_owned();
    let r = b.get(&back).send().await.unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["location"], "/vms/web-1?tab=history");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("covm_session=") && set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let who: serde_json::Value =
        b.get(format!("{}/api/v1/session", s.url)).header("cookie", cookie).send().await.unwrap().json().await.unwrap();
    assert_eq!(who["user"]["name"], "alice");
}
