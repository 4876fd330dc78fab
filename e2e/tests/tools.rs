//! The suite's other real components, each on its own: helm on the chart, MinIO through
//! aws-sdk-s3 with a custom endpoint and path-style addressing, and Prometheus scraping a
//! target with a configuration the suite writes.

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use taper_e2e::{minio::Minio, prometheus::Prometheus, workspace_root};

use taper_e2e::minio::tool;

#[test]
fn helm_lints_and_renders_the_chart() {
    let chart = workspace_root().join("charts/taper");
    for args in [vec!["lint", "--strict"], vec!["template", "taper"]] {
        let out = Command::new(tool("helm"))
            .args(&args)
            .arg(&chart)
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("taper-helm-cache"),
            )
            .env(
                "HELM_CONFIG_HOME",
                std::env::temp_dir().join("taper-helm-config"),
            )
            .env(
                "HELM_DATA_HOME",
                std::env::temp_dir().join("taper-helm-data"),
            )
            .output()
            .expect("helm runs");
        assert!(
            out.status.success(),
            "helm {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn minio_serves_put_get_list_to_aws_sdk_s3() {
    let minio = Minio::start().expect("minio starts");
    let creds = aws_sdk_s3::config::Credentials::new(
        taper_e2e::minio::ACCESS_KEY,
        taper_e2e::minio::SECRET_KEY,
        None,
        None,
        "e2e",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .credentials_provider(creds)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(minio.endpoint())
        .force_path_style(true)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(config);
    s3.create_bucket()
        .bucket("e2e")
        .send()
        .await
        .expect("create bucket");
    for key in [
        "runs/a/latest.json",
        "runs/a/step-000000001/manifest.json",
        "runs/b/x",
    ] {
        s3.put_object()
            .bucket("e2e")
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(
                key.as_bytes().to_vec(),
            ))
            .send()
            .await
            .expect("put");
    }
    let got = s3
        .get_object()
        .bucket("e2e")
        .key("runs/a/latest.json")
        .send()
        .await
        .expect("get");
    let body = got.body.collect().await.expect("body").into_bytes();
    assert_eq!(&body[..], b"runs/a/latest.json");
    let listed = s3
        .list_objects_v2()
        .bucket("e2e")
        .prefix("runs/a/")
        .send()
        .await
        .expect("list");
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(
        keys,
        ["runs/a/latest.json", "runs/a/step-000000001/manifest.json"]
    );
}

/// A one-metric exporter on a free port.
fn serve_metrics() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = stream.read(&mut buf);
            let body = "# HELP taper_e2e_probe A constant for the e2e suite.\n# TYPE taper_e2e_probe gauge\ntaper_e2e_probe 42\n";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn prometheus_scrapes_a_target() {
    let port = serve_metrics();
    let prom =
        Prometheus::start("probe", &[format!("127.0.0.1:{port}")]).expect("prometheus starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = prom.query("taper_e2e_probe{job=\"probe\"}").expect("query");
        let value = answer["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_string);
        if value.as_deref() == Some("42") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no sample of taper_e2e_probe after 60 s: {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = prom.query("up{job=\"probe\"}").expect("query");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let pid = prom.pid();
    drop(prom);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "prometheus outlived its handle"
    );
}
