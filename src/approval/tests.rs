//! Deciding: who may narrow what, first decider wins, expired and unknown ids.

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::new(dir.path(), None);
    (dir, s)
}

fn grant(id: &str, routes: &[&str], ttl: u64, expires_in: i64) -> Pending {
    let now = crate::auth::unix_now();
    Pending {
        id: id.into(),
        kind: Kind::Session,
        agent: "bot".into(),
        on_behalf_of: Some("alice".into()),
        task: None,
        created: now,
        expires: (now as i64 + expires_in) as u64,
        replica: None,
        request: None,
        grant: Some(GrantAsk {
            routes: routes.iter().map(|r| r.to_string()).collect(),
            ttl_secs: ttl,
            offered: Vec::new(),
        }),
    }
}

#[tokio::test]
async fn the_first_decision_stands_and_a_second_is_refused_naming_the_first() {
    let (_d, s) = store();
    s.put_pending(&grant("g1", &["a", "b"], 600, 60))
        .await
        .unwrap();
    let d = decide(&s, "g1", true, "carol", None, &Narrowing::default())
        .await
        .unwrap();
    assert!(d.approve);
    let err = decide(&s, "g1", false, "dave", Some("no"), &Narrowing::default())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "approval g1 was already approved by carol");
    assert_eq!(s.decision("g1").await.unwrap().unwrap().approver, "carol");
}

#[tokio::test]
async fn a_grant_may_be_narrowed_but_never_widened() {
    let (_d, s) = store();
    s.put_pending(&grant("g2", &["a", "b"], 600, 60))
        .await
        .unwrap();
    let widen = |routes: Option<Vec<&str>>, ttl: Option<u64>| Narrowing {
        routes: routes.map(|r| r.into_iter().map(String::from).collect()),
        ttl: ttl.map(Duration::from_secs),
        for_duration: None,
    };
    for n in [
        widen(Some(vec!["c"]), None),
        widen(Some(vec![]), None),
        widen(None, Some(601)),
        Narrowing {
            for_duration: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    ] {
        let err = decide(&s, "g2", true, "carol", None, &n).await.unwrap_err();
        assert!(matches!(err, DecideError::Invalid(_)), "{err}");
    }
    let d = decide(
        &s,
        "g2",
        true,
        "carol",
        None,
        &widen(Some(vec!["b"]), Some(60)),
    )
    .await
    .unwrap();
    assert_eq!(d.routes, Some(vec!["b".to_owned()]));
    assert_eq!(d.ttl_secs, Some(60));
    let p = s.pending("g2").await.unwrap().unwrap();
    assert_eq!(approved_text(&p, Some(&d)), "session for routes b for 1m");
}

#[tokio::test]
async fn expired_unknown_and_malformed_ids_cannot_be_decided() {
    let (_d, s) = store();
    s.put_pending(&grant("g3", &[], 600, -1)).await.unwrap();
    let n = Narrowing::default();
    assert!(matches!(
        decide(&s, "g3", true, "c", None, &n).await,
        Err(DecideError::Expired(_))
    ));
    assert!(matches!(
        decide(&s, "g404", true, "c", None, &n).await,
        Err(DecideError::Unknown(_))
    ));
    for bad in ["../x", "", "a.b", &"a".repeat(65)] {
        assert!(!valid_id(bad));
        assert!(matches!(
            decide(&s, bad, true, "c", None, &n).await,
            Err(DecideError::Unknown(_))
        ));
    }
}

#[tokio::test]
async fn approver_names_and_reasons_lose_control_characters() {
    let (_d, s) = store();
    s.put_pending(&grant("g4", &[], 600, 60)).await.unwrap();
    let d = decide(
        &s,
        "g4",
        false,
        "car\u{1b}[31mol",
        Some("no\nway"),
        &Narrowing::default(),
    )
    .await
    .unwrap();
    assert_eq!(d.approver, "car[31mol");
    assert_eq!(d.reason.as_deref(), Some("noway"));
    let blank = decide(&s, "g4", false, "\u{7}", None, &Narrowing::default()).await;
    assert!(blank.is_err());
}

#[tokio::test]
async fn files_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, s) = store();
    s.put_pending(&grant("g5", &[], 600, 60)).await.unwrap();
    decide(&s, "g5", true, "c", None, &Narrowing::default())
        .await
        .unwrap();
    let d = dir.path().join("approvals");
    assert_eq!(
        std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["g5.json", "g5.decision.json"] {
        let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[tokio::test]
async fn a_grant_for_every_route_may_be_narrowed_only_to_routes_the_agent_has() {
    let (_d, s) = store();
    let mut p = grant("g6", &[], 600, 60);
    p.grant.as_mut().unwrap().offered = vec!["read".into(), "write".into()];
    s.put_pending(&p).await.unwrap();
    let to = |r: &[&str]| Narrowing {
        routes: Some(r.iter().map(|r| r.to_string()).collect()),
        ..Default::default()
    };
    let err = decide(&s, "g6", true, "c", None, &to(&["read", "admin"]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"admin\" was not asked for"),
        "{err}"
    );
    let d = decide(&s, "g6", true, "c", None, &to(&["read"]))
        .await
        .unwrap();
    assert_eq!(d.routes, Some(vec!["read".to_owned()]));
}
