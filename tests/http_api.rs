//! The OpenAPI document at `/openapi.json` is the one generated from the
//! code's routes, is a valid OpenAPI 3.1 document (openapi-spec-validator),
//! documents every route the service answers and nothing it does not, and
//! every real answer (status, content type, JSON body with no undocumented
//! field) matches it (tests/support/check_openapi.py).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Broker, Names, Redis, Service, event, run_python};

const TOKEN: &str = "s3cret-token-for-the-api";

/// One request: status, content type (without parameters) and body.
fn call(service: &Service, method: &str, path: &str, token: bool) -> (u16, String, String) {
    let mut s = TcpStream::connect(&service.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = if token {
        format!("Authorization: Bearer {TOKEN}\r\n")
    } else {
        String::new()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.split(';').next().unwrap().trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[test]
fn the_openapi_document_describes_every_route_and_every_answer() {
    let broker = Broker::start();
    let redis = Redis::start();
    let names = Names::new();
    broker.create_topics(&names.all(), 2);
    let service = Service::start(
        &broker,
        &redis,
        &names,
        &[("LEADSCORE__HTTP__AUTH_TOKEN", TOKEN)],
    );
    let lead = "crm-openapi-1";
    broker.produce(
        &names.web,
        &[
            (
                lead,
                event(
                    "w1",
                    lead,
                    "2026-11-20T10:00:00Z",
                    "page_view",
                    &[("url", "/pricing"), ("utm_source", "google")],
                ),
            ),
            (
                lead,
                event("w2", lead, "2026-11-20T10:01:00Z", "booking_abandoned", &[]),
            ),
        ],
    );
    service.wait_consumed(2, Duration::from_secs(30));
    service.wait_settled(Duration::from_secs(30));

    // Served = generated from the routes.
    let (status, content_type, served) = call(&service, "GET", "/openapi.json", false);
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let served: serde_json::Value = serde_json::from_str(&served).unwrap();
    let generated = serde_json::to_value(leadscore::http::openapi_document()).unwrap();
    assert_eq!(served, generated);

    // Every documented operation is routed…
    let documented: Vec<(String, String)> = served["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "put", "post", "delete", "patch", "head"].contains(&m.as_str()))
                .map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    let mut expected = vec![
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/readyz", "get"),
        ("/v1/leads/{id}", "delete"),
        ("/v1/leads/{id}", "get"),
        ("/v1/leads/{id}/explain", "get"),
    ];
    expected.sort();
    let mut got: Vec<(&str, &str)> = documented
        .iter()
        .map(|(p, m)| (p.as_str(), m.as_str()))
        .collect();
    got.sort();
    assert_eq!(got, expected);

    // …and answers as documented (real answers, checked against the schemas).
    let long = "x".repeat(300);
    let samples: Vec<(&str, &str, String, bool)> = vec![
        ("get", "/metrics", "/metrics".into(), false),
        ("get", "/healthz", "/healthz".into(), false),
        ("get", "/readyz", "/readyz".into(), false),
        ("get", "/openapi.json", "/openapi.json".into(), false),
        ("get", "/v1/leads/{id}", format!("/v1/leads/{lead}"), true),
        ("get", "/v1/leads/{id}", format!("/v1/leads/{lead}"), false),
        ("get", "/v1/leads/{id}", "/v1/leads/nobody".into(), true),
        ("get", "/v1/leads/{id}", format!("/v1/leads/{long}"), true),
        // Not UTF-8: the API's JSON error, not the router's text.
        ("get", "/v1/leads/{id}", "/v1/leads/%FF%FE".into(), true),
        (
            "get",
            "/v1/leads/{id}/explain",
            format!("/v1/leads/{lead}/explain"),
            true,
        ),
        (
            "get",
            "/v1/leads/{id}/explain",
            "/v1/leads/nobody/explain".into(),
            true,
        ),
        (
            "delete",
            "/v1/leads/{id}",
            format!("/v1/leads/{long}"),
            true,
        ),
        (
            "delete",
            "/v1/leads/{id}",
            format!("/v1/leads/{lead}"),
            false,
        ),
        (
            "delete",
            "/v1/leads/{id}",
            format!("/v1/leads/{lead}"),
            true,
        ),
    ];
    let mut lines = String::new();
    let mut statuses = Vec::new();
    for (method, template, path, token) in &samples {
        let (status, content_type, body) = call(&service, &method.to_uppercase(), path, *token);
        statuses.push(status);
        let body = if content_type == "application/json" {
            serde_json::from_str(&body).unwrap()
        } else {
            serde_json::Value::String(body)
        };
        lines.push_str(
            &serde_json::json!({
                "method": method, "path": template, "status": status,
                "content_type": content_type, "body": body,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    assert_eq!(
        statuses,
        [
            200, 200, 200, 200, 200, 401, 404, 400, 400, 200, 404, 400, 401, 202
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("openapi.json");
    std::fs::write(&doc_file, served.to_string()).unwrap();
    let samples_file = dir.path().join("answers.ndjson");
    std::fs::write(&samples_file, lines).unwrap();
    let (code, out, err) = run_python(
        &[
            "tests/support/check_openapi.py",
            doc_file.to_str().unwrap(),
            samples_file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{out}\n{err}");

    // What is not documented is not served.
    for (method, path) in [
        ("POST", format!("/v1/leads/{lead}")),
        ("PUT", format!("/v1/leads/{lead}")),
        ("DELETE", format!("/v1/leads/{lead}/explain")),
        ("POST", "/metrics".to_owned()),
    ] {
        let (status, content_type, body) = call(&service, method, &path, true);
        assert_eq!(status, 405, "{method} {path}");
        assert_eq!(content_type, "application/json", "{method} {path}");
        assert!(
            body.contains("method not allowed"),
            "{method} {path}: {body}"
        );
    }
    for path in [
        "/v1/leads",
        "/v1/leads/a/b",
        "/v2/leads/a",
        "/openapi.yaml",
        "/",
    ] {
        let (status, _, body) = call(&service, "GET", path, true);
        assert_eq!(
            (status, body.contains("no such route")),
            (404, true),
            "{path}"
        );
    }
}
