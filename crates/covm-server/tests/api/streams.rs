//! Long-lived streams: capped per user, and ended within a second when their caller loses the right
//! to them (a grant revoked, a token revoked, the user deleted).

use std::time::{Duration, Instant};

use covm_types::api::PoolCreate;
use covm_types::vm::{VmChange, VmConfig};
use futures::StreamExt;

use crate::common::{TestServer, name, vm_named};

/// A pool (without limits) in the folder `/team-a`.
fn team_pool(pool: &str) -> PoolCreate {
    PoolCreate { name: name(pool), quota: Default::default(), folder: Some("/team-a".into()) }
}

/// Waits until `stream` ends (or breaks); how long that took. Panics after `max`.
async fn ends_within<S: futures::Stream + Unpin>(stream: &mut S, max: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(max.saturating_sub(started.elapsed()), stream.next()).await {
            Ok(None) => return started.elapsed(),
            Ok(Some(_)) => continue,
            Err(_) => panic!("the stream was still open after {max:?}"),
        }
    }
}

#[tokio::test]
async fn streams_end_when_their_caller_loses_the_right_to_them() {
    let s = TestServer::start().await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.pool_create(&team_pool("pa")).await.unwrap();
    s.admin.vm_create(&VmConfig { folder: "/team-a".into(), pool: "pa".into(), ..vm_named("v1") }).await.unwrap();
    let bob = s.user("bob").await;
    let grant = s.admin.permission_grant("bob", "VMUser", "/team-a", true).await.unwrap();

    // A revoked grant ends the console; the feed (which needs no grant) stays.
    let mut console = bob.serial_follow("v1", 10).await.unwrap();
    let mut feed = bob.events_follow(None, None).await.unwrap();
    s.admin.permission_revoke(&grant.id.to_string()).await.unwrap();
    let took = ends_within(&mut console, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(1500), "the console ended {took:?} after the revocation");
    assert!(tokio::time::timeout(Duration::from_millis(600), feed.next()).await.is_err(), "the feed stays");
    assert_eq!(bob.serial_follow("v1", 10).await.err().unwrap().status(), Some(404));

    // A signed-out session ends the feed; so does deleting the user.
    bob.logout().await.unwrap();
    let took = ends_within(&mut feed, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(1500), "the feed ended {took:?} after sign-out");
    s.admin.permission_grant("bob", "VMUser", "/team-a", true).await.unwrap();
    let bob = s.login("bob").await;
    let mut console = bob.serial_follow("v1", 10).await.unwrap();
    let mut feed = bob.events_follow(None, None).await.unwrap();
    s.admin.user_delete("bob").await.unwrap();
    let took = ends_within(&mut console, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(1500), "the console ended {took:?} after the user was deleted");
    let took = ends_within(&mut feed, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(1500), "the feed ended {took:?} after the user was deleted");
}

#[tokio::test]
async fn a_user_holds_a_bounded_number_of_streams() {
    let s = TestServer::start().await;
    let eve = s.user("eve").await;
    let mut open = Vec::new();
    for _ in 0..covm_server::app::streams::PER_USER {
        open.push(eve.events_follow(Some(0), None).await.unwrap());
    }
    let e = eve.events_follow(Some(0), None).await.err().unwrap();
    assert_eq!(e.status(), Some(429));
    assert_eq!(e.code(), Some(covm_types::ErrorCode::RateLimited));
    // Another user is not affected, and closing one makes room.
    let _admin = s.admin.events_follow(None, None).await.unwrap();
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.push(eve.events_follow(Some(0), None).await.unwrap());
}

/// A user who may see nothing replays the whole log (more than the in-memory ring holds) and gets
/// nothing, while a user who may see one VM gets exactly its events, in order.
#[tokio::test]
async fn a_replay_from_the_start_delivers_only_what_the_reader_may_see() {
    let s = TestServer::start().await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.pool_create(&team_pool("pa")).await.unwrap();
    s.admin.vm_create(&VmConfig { folder: "/team-a".into(), pool: "pa".into(), ..vm_named("seen") }).await.unwrap();
    s.admin.vm_create(&VmConfig { pool: "default".into(), ..vm_named("unseen") }).await.unwrap();
    for i in 0..1000 {
        let vm = if i % 100 == 0 { "seen" } else { "unseen" };
        let patch = VmChange { description: Some(format!("{i}")), ..Default::default() };
        s.admin.vm_change(vm, &patch, &Default::default()).await.unwrap();
    }
    let nobody = s.user("nobody").await;
    let ann = s.user("ann").await;
    s.admin.permission_grant("ann", "ReadOnly", "/team-a", true).await.unwrap();
    // Restarted: the ring starts at the head, so the replay comes from the store.
    let mut s = s;
    s.restart().await;
    let mut feed = nobody.events_follow(Some(0), None).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(1), feed.next()).await.is_err(), "nobody sees nothing");
    let mut feed = ann.events_follow(Some(0), None).await.unwrap();
    let mut all = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(1), feed.next()).await {
        all.push(e.unwrap());
    }
    assert!(all.iter().all(|e| e.object_name.as_deref() != Some("unseen")), "{all:?}");
    assert_eq!(all.iter().filter(|e| e.object_name.as_deref() == Some("seen")).count(), 11);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in order, each once");
}
