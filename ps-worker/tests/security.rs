//! Who gets into real server processes: bearer tokens, mutual TLS, and
//! hostile requests answered with their status.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};

use common::pki::pki;
use common::workers::*;
use common::{Server, counting_table, peer_token_file, temp_dir};

#[test]
fn a_server_with_a_token_file_serves_only_workers_with_the_same_token() {
    let dir = temp_dir("auth");
    let token = dir.join("token");
    std::fs::write(&token, "a-long-enough-token-0123\n").unwrap();
    let other = dir.join("other");
    std::fs::write(&other, "another-token-0123456789").unwrap();
    let server = Server::start_with(0, 1, &["--auth-token-file", token.to_str().unwrap()]);
    let job = a9a_job_edited(&dir, "job.toml", &[("epochs = 5", "epochs = 1")]);
    let train = |token: Option<&Path>| {
        let mut args = vec![
            "train",
            "--config",
            job.to_str().unwrap(),
            "--servers",
            &server.addr,
            "--rank",
            "0",
            "--world",
            "1",
            "--connect-timeout-secs",
            "2",
        ];
        if let Some(t) = token {
            args.extend(["--auth-token-file", t.to_str().unwrap()]);
        }
        worker(&args).output().unwrap()
    };
    for (token, expected) in [
        (None, "missing bearer token"),
        (Some(other.as_path()), "invalid bearer token"),
    ] {
        let out = train(token);
        assert!(!out.status.success());
        assert!(stderr_of(&out).contains(expected), "{}", stderr_of(&out));
    }
    let out = train(Some(&token));
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn over_mutual_tls_only_clients_with_a_certificate_of_the_job_s_ca_get_in() {
    use ps_common::tls::TlsFiles;
    use ps_worker::{ClientConfig, PsClient};

    let dir = temp_dir("tls");
    let (job_ca, other_ca) = (pki(&dir, "job"), pki(&dir, "other"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let flags = [
        "--tls-cert".to_string(),
        s(&job_ca.server[0]),
        "--tls-key".into(),
        s(&job_ca.server[1]),
        "--tls-ca".into(),
        s(&job_ca.ca),
        "--tls-require-client-cert".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let peer = peer_token_file(&dir);
    let primary = Server::start_with(0, 1, &[&flags[..], &["--peer-token-file", &peer]].concat());
    // Replication runs over TLS too.
    let mut backup = Server::start_with(
        0,
        1,
        &[
            &flags[..],
            &["--peer-token-file", &peer, "--join", &primary.addr],
        ]
        .concat(),
    );
    backup.wait_for_line("joined ");

    let config = |files: TlsFiles| ClientConfig {
        tls: files.client().unwrap(),
        connect_timeout: std::time::Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let worker_files = TlsFiles {
        ca: Some(job_ca.ca.clone()),
        cert: Some(job_ca.client[0].clone()),
        key: Some(job_ca.client[1].clone()),
    };
    let addrs = std::slice::from_ref(&primary.addr);
    let client = PsClient::connect(addrs, &config(worker_files.clone()))
        .await
        .unwrap();
    let spec = counting_table("emb", 1);
    client.create_table(&spec).await.unwrap();
    client.push("emb", &[3], &[-2.0]).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.pull("emb", &[3]).await.unwrap(), [2.0]);
    assert_eq!(
        stats_of_tls(&backup.addr, &worker_files).await,
        1,
        "replicated over TLS"
    );

    let refused = [
        ("plain TCP", TlsFiles::default()),
        (
            "no client certificate",
            TlsFiles {
                ca: Some(job_ca.ca.clone()),
                ..TlsFiles::default()
            },
        ),
        (
            "a certificate of another CA",
            TlsFiles {
                ca: Some(job_ca.ca.clone()),
                cert: Some(other_ca.client[0].clone()),
                key: Some(other_ca.client[1].clone()),
            },
        ),
        (
            "trusting another CA",
            TlsFiles {
                ca: Some(other_ca.ca.clone()),
                cert: Some(job_ca.client[0].clone()),
                key: Some(job_ca.client[1].clone()),
            },
        ),
    ];
    for (what, files) in refused {
        let attempt = PsClient::connect(addrs, &config(files)).await;
        assert!(attempt.is_err(), "{what}: connected");
    }

    let out = worker(&[
        "health",
        "--servers",
        &primary.addr,
        "--tls-ca",
        &s(&job_ca.ca),
        "--tls-cert",
        &s(&job_ca.client[0]),
        "--tls-key",
        &s(&job_ca.client[1]),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// Push calls applied by the shard at `addr`, asked over TLS.
async fn stats_of_tls(addr: &str, files: &ps_common::tls::TlsFiles) -> u64 {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(files.client().unwrap().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ps_common::pb::parameter_server_client::ParameterServerClient::new(channel)
        .stats(ps_common::pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests
        .unwrap()
        .updates_applied
}

/// Unauthenticated, wrong-token, oversized, NaN-carrying and wrong-dim
/// pushes to a real server: each gets its status, and the table is exactly
/// as it was.
#[tokio::test]
async fn hostile_requests_get_their_status_and_leave_the_table_unchanged() {
    use ps_common::pb::{self, parameter_server_client::ParameterServerClient};
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec, wire};
    use tonic::Code;

    const TOKEN: &str = "hostile-test-token-0123";
    let dir = temp_dir("hostile");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let server = Server::start_with(
        0,
        1,
        &[
            "--auth-token-file",
            token.to_str().unwrap(),
            "--max-request-bytes",
            "4096",
        ],
    );
    let mut client = ParameterServerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    /// `message` carrying `token`, if any, as the servers' peers send it.
    fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(t) = token {
            ps_server::auth::Auth::bearer(t).attach(&mut request);
        }
        request
    }
    let spec = TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim: 2,
        initializer: InitializerSpec::Constant { value: 0.5 },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 0,
        lifecycle: Default::default(),
    };
    let create = pb::CreateTableRequest {
        spec: Some((&spec).into()),
    };
    client
        .create_table(with_token(Some(TOKEN), create))
        .await
        .unwrap();
    let push = |keys: Vec<u64>, grads: &[f32]| pb::PushRequest {
        table: "emb".into(),
        keys,
        gradients: wire::encode_f32s(grads),
        ..Default::default()
    };
    let keys: Vec<u64> = (0..8).collect();
    client
        .push(with_token(Some(TOKEN), push(keys.clone(), &[1.0; 16])))
        .await
        .unwrap();
    let read = {
        let client = client.clone();
        let keys = keys.clone();
        move || {
            let (mut client, keys) = (client.clone(), keys.clone());
            async move {
                let pull = pb::PullRequest {
                    table: "emb".into(),
                    keys,
                    ..Default::default()
                };
                let values = client
                    .pull(with_token(Some(TOKEN), pull))
                    .await
                    .unwrap()
                    .into_inner()
                    .values;
                let stats = client
                    .stats(with_token(Some(TOKEN), pb::StatsRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                (
                    values,
                    stats.tables,
                    stats.requests.unwrap().updates_applied,
                )
            }
        }
    };
    let before = read().await;
    let cases = [
        (
            "no token",
            None,
            push(vec![1], &[1.0, 1.0]),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            Some("not-the-token-0123456"),
            push(vec![1], &[1.0, 1.0]),
            Code::Unauthenticated,
        ),
        (
            "oversized",
            Some(TOKEN),
            push((0..2000).collect(), &[1.0; 4000]),
            Code::ResourceExhausted,
        ),
        (
            "NaN gradient",
            Some(TOKEN),
            push(vec![1, 2], &[1.0, 1.0, f32::NAN, 1.0]),
            Code::InvalidArgument,
        ),
        (
            "wrong dim",
            Some(TOKEN),
            push(vec![1, 2], &[1.0, 1.0, 1.0]),
            Code::InvalidArgument,
        ),
    ];
    for (what, token, request, code) in cases {
        let status = client.push(with_token(token, request)).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            !status.message().is_empty(),
            "{what}: a status says what was wrong"
        );
        assert_eq!(read().await, before, "{what} changed the table");
    }
    std::fs::remove_dir_all(&dir).ok();
}
