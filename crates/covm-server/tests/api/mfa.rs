//! Two-factor sign-in (issue 16): enroll, confirm, sign in with a code the test computes (RFC 6238),
//! a replayed code and a used recovery code refused, wrong codes counted as failed sign-ins, the
//! policy that forces enrollment, API tokens unaffected, and no secret in the audit log.

use covm_client::Client;
use covm_types::ErrorCode;
use covm_types::api::{SessionCreate, TokenCreate};

use crate::common::{PASSWORD, TestServer};

/// The code of the step `offset` steps from now, computed from the secret as an authenticator app does.
fn code(user: &str, secret: &str, offset: i64) -> String {
    let t = totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::try_from_base32(secret).unwrap())
        .with_account_name(user)
        .build()
        .unwrap();
    let now = chrono::Utc::now().timestamp() + offset * 30;
    t.generate(u64::try_from(now).unwrap()).to_string()
}

fn signin(user: &str, totp: Option<String>, recovery_code: Option<&str>) -> SessionCreate {
    SessionCreate {
        user: user.into(),
        password: PASSWORD.into(),
        totp,
        recovery_code: recovery_code.map(str::to_owned),
        cookie: false,
    }
}

#[tokio::test]
async fn enroll_confirm_sign_in_with_codes_once_each_and_turn_off() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let api = alice.token_create(&TokenCreate { name: crate::common::name("ci"), expires_in_s: None }).await.unwrap();
    let e = alice.mfa_enroll("alice").await.unwrap();
    assert!(e.otpauth_url.starts_with("otpauth://totp/covm:alice?secret=") && e.otpauth_url.contains(&e.secret));
    assert_eq!(e.recovery_codes.len(), 10);
    // Not on until confirmed: the password alone still signs in; a wrong code does not confirm.
    s.login("alice").await;
    let wrong = alice.mfa_confirm("alice", "000000").await.unwrap_err();
    assert_eq!((wrong.status(), wrong.code()), (Some(400), Some(ErrorCode::MfaInvalid)), "{wrong}");
    alice.mfa_confirm("alice", &code("alice", &e.secret, 0)).await.unwrap();
    assert!(s.admin.users().await.unwrap().iter().any(|u| u.name == "alice" && u.mfa));
    // The password alone is not enough now.
    let anon = s.anonymous();
    let need = anon.login("alice", PASSWORD).await.unwrap_err();
    assert_eq!((need.status(), need.code()), (Some(401), Some(ErrorCode::MfaRequired)), "{need}");
    // The code that confirmed is used; the next step's code signs in, once.
    let used = anon.login_with(&signin("alice", Some(code("alice", &e.secret, 0)), None)).await.unwrap_err();
    assert_eq!(used.code(), Some(ErrorCode::MfaInvalid), "a code is accepted once");
    let next = code("alice", &e.secret, 1);
    let (session, _) = anon.login_with(&signin("alice", Some(next.clone()), None)).await.unwrap();
    session.whoami(None).await.unwrap();
    let replay = anon.login_with(&signin("alice", Some(next), None)).await.unwrap_err();
    assert_eq!((replay.status(), replay.code()), (Some(401), Some(ErrorCode::MfaInvalid)), "{replay}");
    // A recovery code works once (spelled loosely).
    let rc = e.recovery_codes[3].to_uppercase();
    anon.login_with(&signin("alice", None, Some(&rc))).await.unwrap();
    let again = anon.login_with(&signin("alice", None, Some(&rc))).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::MfaInvalid));
    // API tokens made before go on working.
    Client::new(&s.url).with_token(api.token.unwrap()).whoami(None).await.unwrap();
    // Enrolling again while on is refused; turning off needs a code (or Permissions.Modify).
    assert_eq!(session.mfa_enroll("alice").await.unwrap_err().code(), Some(ErrorCode::MfaState));
    let e403 = session.mfa_disable("alice", None).await.unwrap_err();
    assert_eq!(e403.status(), Some(403), "{e403}");
    session.mfa_disable("alice", Some(&code("alice", &e.secret, -1))).await.unwrap_err();
    s.admin.mfa_disable("alice", None).await.unwrap();
    s.login("alice").await;
    // Nothing secret reached the log: not the TOTP secret, the recovery codes or the password.
    let log = s.log_text().await;
    assert!(log.contains("user.mfa") || log.contains("alice"), "the log was read");
    for secret in [e.secret.as_str(), e.recovery_codes[0].as_str(), PASSWORD] {
        assert!(!log.contains(secret), "the log holds a secret");
    }
}

#[tokio::test]
async fn wrong_codes_count_as_failed_sign_ins() {
    let s = TestServer::start().await;
    let carol = s.user("carol").await;
    let e = carol.mfa_enroll("carol").await.unwrap();
    carol.mfa_confirm("carol", &code("carol", &e.secret, 0)).await.unwrap();
    let anon = s.anonymous();
    let mut limited = false;
    for _ in 0..20 {
        let err = anon.login_with(&signin("carol", Some("123456".into()), None)).await.unwrap_err();
        if err.code() == Some(ErrorCode::RateLimited) {
            limited = true;
            break;
        }
        assert_eq!(err.code(), Some(ErrorCode::MfaInvalid));
    }
    assert!(limited, "guessing codes runs into the sign-in limit");
}

#[tokio::test]
async fn a_policy_makes_members_sign_in_only_to_enroll() {
    let s = TestServer::start().await;
    s.admin.group_create("ops").await.unwrap();
    s.admin.user_create("bob", PASSWORD).await.unwrap();
    s.admin.group_member_add("ops", "bob").await.unwrap();
    let bad = s.admin.mfa_policy_set(&["nope"]).await.unwrap_err();
    assert_eq!(bad.status(), Some(400));
    assert_eq!(s.admin.mfa_policy_set(&["ops"]).await.unwrap().required_for, vec!["ops".to_owned()]);
    let (bob, t) = s.anonymous().login("bob", PASSWORD).await.unwrap();
    assert!(t.enroll_only);
    // Another enroll-only session of bob's (someone else with his password, say).
    let (thief, _) = s.anonymous().login("bob", PASSWORD).await.unwrap();
    let refused = bob.vms(&Default::default()).await.unwrap_err();
    assert_eq!((refused.status(), refused.code()), (Some(403), Some(ErrorCode::MfaEnrollmentRequired)));
    assert_eq!(bob.whoami(None).await.unwrap().user.name, "bob");
    assert_eq!(bob.mfa_enroll("alice").await.unwrap_err().status(), Some(404), "no alice; and never another user");
    let e = bob.mfa_enroll("bob").await.unwrap();
    bob.mfa_confirm("bob", &code("bob", &e.secret, 0)).await.unwrap();
    // The same session is a full one now; the other enroll-only session ended (it showed no code);
    // the next sign-in needs a code and is full.
    bob.vms(&Default::default()).await.unwrap();
    assert_eq!(thief.whoami(None).await.unwrap_err().status(), Some(401));
    let (_, t) = s.anonymous().login_with(&signin("bob", Some(code("bob", &e.secret, 1)), None)).await.unwrap();
    assert!(!t.enroll_only);
    // A user outside the group is not touched by the policy.
    s.admin.user_create("dave", PASSWORD).await.unwrap();
    assert!(!s.anonymous().login("dave", PASSWORD).await.unwrap().1.enroll_only);
}

#[tokio::test]
async fn a_password_change_ends_the_users_other_sessions() {
    let s = TestServer::start().await;
    let here = s.user("erin").await;
    let elsewhere = s.login("erin").await;
    here.user_password_set("erin", "a-new-password-2").await.unwrap();
    here.whoami(None).await.expect("the session it was changed in goes on");
    let ended = elsewhere.whoami(None).await.unwrap_err();
    assert_eq!(ended.status(), Some(401), "the other session ended");
    // Changed by an admin: every session of the user ends.
    s.admin.user_password_set("erin", "a-third-password-3").await.unwrap();
    assert_eq!(here.whoami(None).await.unwrap_err().status(), Some(401));
}
