//! What the web UI needs of the server: sign-in by cookie with its CSRF check, presence on the feed,
//! console tickets, and the UI's own pages with deep links.

use std::time::Duration;

use covm_client::FeedItem;
use covm_types::vm::PresenceState;
use futures::StreamExt;
use reqwest::header;
use serde_json::json;

use crate::common::{Options, PASSWORD, TestServer, vm_named};

fn browser() -> reqwest::Client {
    covm_client::tls::install_provider();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Signs `user` in as a browser does; the `covm_session=…` pair to send back.
async fn cookie_sign_in(s: &TestServer, user: &str, password: &str) -> String {
    let r = browser()
        .post(format!("{}/api/v1/session", s.url))
        .json(&json!({"user": user, "password": password, "cookie": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let set = r.headers()[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    assert!(!set.contains("Secure"), "no Secure flag over plain HTTP: {set}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.get("token").is_none(), "the token stays in the cookie: {body}");
    assert_eq!(body["user"], user);
    set.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn a_browser_signs_in_with_a_cookie_and_changes_need_the_csrf_header() {
    let s = TestServer::start().await;
    let cookie = cookie_sign_in(&s, "admin", &s.admin_password).await;
    let b = browser();
    let url = |p: &str| format!("{}/api/v1{p}", s.url);

    let r = b.get(url("/session")).header(header::COOKIE, &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["user"]["name"], "admin");

    // A change without the header, from another site, or from a page of another origin: refused,
    // and nothing is made.
    let folder = json!({"name": "f1", "parent": "/"});
    let refused = [
        b.post(url("/folders")).header(header::COOKIE, &cookie).json(&folder),
        b.post(url("/folders"))
            .header(header::COOKIE, &cookie)
            .header("x-covm-csrf", "1")
            .header("sec-fetch-site", "cross-site")
            .json(&folder),
        b.post(url("/folders"))
            .header(header::COOKIE, &cookie)
            .header("x-covm-csrf", "1")
            .header(header::ORIGIN, "https://evil.example")
            .json(&folder),
    ];
    for rb in refused {
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 403);
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "csrf_failed", "{e}");
    }
    assert!(s.admin.folders().await.unwrap().items.iter().all(|f| f.name != "f1"));
    // From the page itself: made.
    let origin = format!("http://{}", s.url.trim_start_matches("http://"));
    let r = b
        .post(url("/folders"))
        .header(header::COOKIE, &cookie)
        .header("x-covm-csrf", "1")
        .header("sec-fetch-site", "same-origin")
        .header(header::ORIGIN, origin)
        .json(&folder)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // A bearer token needs no CSRF header (no browser sends it by itself).
    s.admin.folder_create("f2", "/").await.unwrap();

    // Signing out ends the session on the server and drops the cookie.
    let r = b.delete(url("/session")).header(header::COOKIE, &cookie).header("x-covm-csrf", "1").send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()[header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    let r = b.get(url("/session")).header(header::COOKIE, &cookie).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_cookie_is_secure_under_tls() {
    let s = TestServer::start_tls().await;
    let ca = reqwest::Certificate::from_pem(s.ca_pem().unwrap().as_bytes()).unwrap();
    covm_client::tls::install_provider();
    let b = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let r = b
        .post(format!("{}/api/v1/session", s.url))
        .json(&json!({"user": "admin", "password": s.admin_password, "cookie": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers()[header::SET_COOKIE].to_str().unwrap().contains("; Secure"));
}

#[tokio::test]
async fn presence_comes_and_goes_on_the_feed_and_a_lease_shows_as_editing() {
    let s =
        TestServer::start_options(Options { presence_ttl: Duration::from_millis(1500), ..Options::default() }).await;
    let vm = s.admin.vm_create(&vm_named("v1")).await.unwrap();
    let ann = s.user("ann").await;
    let bob = s.user("bob").await;
    s.admin.permission_grant("ann", "Admin", "/", true).await.unwrap();
    s.admin.permission_grant("bob", "VMUser", "/", true).await.unwrap();
    let carol = s.user("carol").await; // may see nothing

    let mut feed = bob.feed_follow(None, Some(vm.id)).await.unwrap();
    let mut next_presence = async || loop {
        match tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .expect("a presence event")
            .unwrap()
            .unwrap()
        {
            FeedItem::Presence(p) => return p,
            FeedItem::Event(_) => continue,
        }
    };

    let now = ann.presence_set("v1", PresenceState::Viewing).await.unwrap();
    assert_eq!(now.iter().map(|e| (e.user.as_str(), e.state)).collect::<Vec<_>>(), [("ann", PresenceState::Viewing)]);
    let p = next_presence().await;
    assert_eq!((p.vm, p.entries.len(), p.entries[0].user.as_str()), (vm.id, 1, "ann"));
    // A heartbeat that changes nothing is not told again; a new state is.
    ann.presence_set("v1", PresenceState::Viewing).await.unwrap();
    ann.presence_set("v1", PresenceState::Editing).await.unwrap();
    assert_eq!(next_presence().await.entries[0].state, PresenceState::Editing);
    bob.presence_set("v1", PresenceState::Viewing).await.unwrap();
    assert_eq!(next_presence().await.entries.len(), 2);
    let list = bob.presence("v1").await.unwrap();
    assert_eq!(list.iter().map(|e| e.user.as_str()).collect::<Vec<_>>(), ["ann", "bob"]);

    // Leaving is told at once; a heartbeat that stops is forgotten after the TTL.
    bob.presence_leave("v1").await.unwrap();
    assert_eq!(next_presence().await.entries.len(), 1);
    let started = std::time::Instant::now();
    let p = next_presence().await;
    assert!(p.entries.is_empty(), "{p:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "expired after {:?}", started.elapsed());

    // The holder of the edit lease shows as editing without a heartbeat.
    ann.lease_acquire("v1", 60).await.unwrap();
    let p = next_presence().await;
    assert_eq!(
        p.entries.iter().map(|e| (e.user.as_str(), e.state)).collect::<Vec<_>>(),
        [("ann", PresenceState::Editing)]
    );
    ann.lease_release("v1", false).await.unwrap();
    assert!(next_presence().await.entries.is_empty());

    // Someone who may not see the VM can neither say nor read who is on it.
    assert_eq!(carol.presence_set("v1", PresenceState::Viewing).await.err().unwrap().status(), Some(404));
    assert_eq!(carol.presence("v1").await.err().unwrap().status(), Some(404));
    // Presence is not in the log.
    let kinds: Vec<String> = s
        .admin
        .events(&covm_types::api::EventQuery { limit: Some(1000), ..Default::default() })
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.iter().all(|k| !k.contains("presence")), "{kinds:?}");
}

#[tokio::test]
async fn a_console_ticket_works_once_for_its_vm() {
    let s = TestServer::start().await;
    s.admin.vm_create(&vm_named("v1")).await.unwrap();
    s.admin.vm_create(&vm_named("v2")).await.unwrap();
    let bob = s.user("bob").await;
    assert_eq!(bob.console_ticket("v1").await.err().unwrap().status(), Some(404), "bob may not see v1");
    s.admin.permission_grant("bob", "VMUser", "/", true).await.unwrap();
    let t = bob.console_ticket("v1").await.unwrap();
    assert!(t.ticket.len() >= 32 && t.expires_at > chrono::Utc::now());

    let ws = |vm: &str, ticket: &str| {
        let url = format!("{}/api/v1/vms/{vm}/console/vnc?ticket={ticket}", s.url.replace("http://", "ws://"));
        async move { tokio_tungstenite::connect_async(url).await }
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            (resp.status().as_u16(), body["error"]["code"].as_str().unwrap().to_owned())
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected"),
    };
    // The ticket is for v1: v2 refuses it (and it is used up); v1 (off, simulated) says why there is
    // no console; a used ticket works no more.
    assert_eq!(status(ws("v2", &t.ticket).await), (401, "unauthenticated".into()));
    assert_eq!(status(ws("v1", &t.ticket).await), (401, "unauthenticated".into()));
    let t = bob.console_ticket("v1").await.unwrap();
    assert_eq!(status(ws("v1", &t.ticket).await), (409, "vm_not_running".into()));
    assert_eq!(status(ws("v1", &t.ticket).await), (401, "unauthenticated".into()));
    assert_eq!(status(ws("v1", "junk").await), (401, "unauthenticated".into()));
    // A ticket does not stand in for a session elsewhere.
    let t = bob.console_ticket("v1").await.unwrap();
    let r = browser().get(format!("{}/api/v1/vms/v1/console/serial?ticket={}", s.url, t.ticket)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = browser().get(format!("{}/api/v1/vms/v1?ticket={}", s.url, t.ticket)).send().await.unwrap();
    assert_eq!(r.status(), 400, "not a parameter of that path");
}

#[tokio::test]
async fn the_ui_is_served_with_deep_links_and_the_api_stays_json() {
    let s = TestServer::start().await;
    let b = browser();
    for path in ["/", "/vms/web-1", "/audit", "/disks/d1"] {
        let r = b.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache", "index.html is checked again each time");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(r.text().await.unwrap().contains("<html"));
    }
    if covm_server::ui::built() {
        let index = b.get(&s.url).send().await.unwrap().text().await.unwrap();
        let asset = index.split('"').find(|p| p.starts_with("/assets/") && p.ends_with(".js")).expect("a script asset");
        let r = b.get(format!("{}{asset}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()[header::CONTENT_TYPE].to_str().unwrap().contains("javascript"));
        assert_eq!(r.headers()[header::CACHE_CONTROL], "public, max-age=31536000, immutable");
    }
    for path in ["/api/v1/nope", "/api/nope"] {
        let r = b.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "no_route");
    }
    let sso: serde_json::Value = b.get(format!("{}/api/v1/sso", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(sso["enabled"], false, "the sign-in page offers single sign-on only where it is on");
    let r = b.post(format!("{}/vms/x", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Sign-in still answers on the API.
    let r = b
        .post(format!("{}/api/v1/session", s.url))
        .json(&json!({"user":"admin","password":PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
