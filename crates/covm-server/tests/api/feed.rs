//! The live feed: in order, each event once across a reconnect, only what the reader may view.

use std::time::Duration;

use covm_types::api::EventView;
use futures::StreamExt;

use crate::common::TestServer;

async fn take(
    stream: &mut futures::stream::BoxStream<'static, covm_client::Result<EventView>>,
    n: usize,
) -> Vec<EventView> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream is open")
            .expect("a good event");
        out.push(ev);
    }
    out
}

#[tokio::test]
async fn a_subscriber_that_reconnects_gets_every_event_once_in_order() {
    let s = TestServer::start().await;
    let head = s.admin.events(&Default::default()).await.unwrap().items.last().map_or(0, |e| e.seq);
    let mut stream = s.admin.events_follow(Some(head), None).await.unwrap();
    for i in 0..20 {
        s.admin.folder_create(&format!("f{i:02}"), "/").await.unwrap();
    }
    let first = take(&mut stream, 8).await;
    drop(stream);
    for i in 20..40 {
        s.admin.folder_create(&format!("f{i:02}"), "/").await.unwrap();
    }
    let mut stream = s.admin.events_follow(Some(first.last().unwrap().seq), None).await.unwrap();
    let rest = take(&mut stream, 32).await;
    let all: Vec<EventView> = first.into_iter().chain(rest).collect();
    let names: Vec<String> = all.iter().map(|e| e.object_name.clone().unwrap()).collect();
    let expected: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
    assert_eq!(names, expected, "every event once, in order");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    // Nothing more is pending.
    assert!(tokio::time::timeout(Duration::from_millis(300), stream.next()).await.is_err());
}

#[tokio::test]
async fn the_feed_shows_only_what_the_reader_may_view() {
    let s = TestServer::start().await;
    let bob = s.user("bob").await;
    s.admin.folder_create("team-a", "/").await.unwrap();
    s.admin.folder_create("team-b", "/").await.unwrap();
    s.admin.permission_grant("bob", "ReadOnly", "/team-a", true).await.unwrap();
    let mut stream = bob.events_follow(None, None).await.unwrap();
    s.admin.folder_create("secret", "/team-b").await.unwrap();
    s.admin.folder_create("open", "/team-a").await.unwrap();
    let got = take(&mut stream, 1).await;
    assert_eq!(got[0].object_name.as_deref(), Some("open"));
    assert_eq!(got[0].kind, "folder.created");
    assert_eq!(got[0].actor, "admin");
    // The JSON page agrees.
    let page = bob.events(&Default::default()).await.unwrap();
    let names: Vec<_> = page.items.iter().filter_map(|e| e.object_name.clone()).collect();
    assert!(names.contains(&"open".to_string()) && !names.contains(&"secret".to_string()), "{names:?}");
    // Audit-only entries never reach the feed.
    assert!(page.items.iter().all(|e| !e.kind.starts_with("session.") && !e.kind.starts_with("authz.")));
}

#[tokio::test]
async fn the_feed_delivers_within_milliseconds() {
    let s = TestServer::start().await;
    let mut stream = s.admin.events_follow(None, None).await.unwrap();
    // Give the subscription a moment to be registered before the write.
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.admin.folder_create("quick", "/").await.unwrap();
    // Not a timing assertion: the generous bound only catches a feed that waits for its poll timer.
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.object_name.as_deref(), Some("quick"));
}
