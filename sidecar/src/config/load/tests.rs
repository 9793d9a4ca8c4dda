use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn issues(result: Result<Config, ConfigError>) -> Vec<ConfigIssue> {
    match result {
        Err(ConfigError::Invalid(issues)) => issues,
        other => panic!("expected invalid configuration, got {other:?}"),
    }
}

#[test]
fn defaults_need_nothing() {
    let config = load(&Overrides::default(), env(&[])).unwrap();
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(config.engine.slot_dir, PathBuf::from("kvsidecar-data/slots"));
    assert_eq!(config.prefix.block_tokens.get(), 64);
}

#[test]
fn rendered_config_loads_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendered.toml");
    let original = load(&Overrides::default(), env(&[("KVSIDECAR_ENGINE_CACHE_TYPE_K", "q8_0"), ("KVSIDECAR_STORE_CAPACITY", "3GiB")])).unwrap();
    std::fs::write(&path, original.to_toml()).unwrap();
    let reloaded = load(&Overrides { config_file: Some(path), ..Overrides::default() }, env(&[])).unwrap();
    assert_eq!(reloaded.to_toml(), original.to_toml());
    assert_eq!(reloaded.engine.cache_type_k, crate::config::KvCacheType::Q8_0);
    assert_eq!(reloaded.store.capacity, ByteSize::gib(3));
}

#[test]
fn environment_sets_keys() {
    let config = load(
        &Overrides::default(),
        env(&[("KVSIDECAR_STORE_CAPACITY", "2GiB"), ("KVSIDECAR_SNAPSHOT_MIN_TOKENS", "10"), ("KVSIDECAR_CACHE", "/tmp/x")]),
    )
    .unwrap();
    assert_eq!(config.store.capacity, ByteSize::gib(2));
    assert_eq!(config.snapshot.min_tokens, 10);
}

#[test]
fn flags_override_environment() {
    let overrides = Overrides { engine: Some("http://127.0.0.1:9999".into()), ..Overrides::default() };
    let config = load(&overrides, env(&[("KVSIDECAR_ENGINE_URL", "http://127.0.0.1:1")])).unwrap();
    assert_eq!(config.engine.url.to_string(), "http://127.0.0.1:9999/");
}

#[test]
fn every_bad_key_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"nowhere\"\n[store]\ncapacity = \"lots\"\ncolour = 1\n[prefix]\nblock_tokens = 0\n").unwrap();
    let overrides = Overrides { config_file: Some(path), ..Overrides::default() };
    let found = issues(load(&overrides, env(&[("KVSIDECAR_ENGINE_RESPONSE_TIMEOUT", "5")])));
    let paths: Vec<&str> = found.iter().map(|issue| issue.path.as_str()).collect();
    assert!(paths.contains(&"server.listen"), "{paths:?}");
    assert!(paths.contains(&"store.capacity"), "{paths:?}");
    assert!(paths.contains(&"store.colour"), "{paths:?}");
    assert!(paths.contains(&"prefix.block_tokens"), "{paths:?}");
    assert!(paths.contains(&"engine.response_timeout"), "{paths:?}");
    let timeout = found.iter().find(|issue| issue.path == "engine.response_timeout").unwrap();
    assert_eq!(timeout.origin, "environment KVSIDECAR_ENGINE_RESPONSE_TIMEOUT");
    assert!(timeout.rule.contains("duration"));
}

#[test]
fn unknown_variable_and_bad_filter_rejected() {
    let found = issues(load(
        &Overrides::default(),
        env(&[("KVSIDECAR_SERVERS_LISTEN", "x"), ("KVSIDECAR_LOG_LEVEL", "debgu"), ("KVSIDECAR_CACHE", "/tmp")]),
    ));
    let paths: Vec<&str> = found.iter().map(|issue| issue.path.as_str()).collect();
    assert_eq!(paths, ["KVSIDECAR_SERVERS_LISTEN", "log.level"]);
}

#[test]
fn same_listen_addresses_rejected() {
    let overrides = Overrides { listen: Some("127.0.0.1:7000".into()), admin_listen: Some("127.0.0.1:7000".into()), ..Overrides::default() };
    let found = issues(load(&overrides, env(&[])));
    assert_eq!(found[0].path, "server.admin_listen");
}

#[test]
fn list_from_environment_in_both_forms() {
    for value in ["a,b", "[\"a\", \"b\"]"] {
        let config = load(&Overrides::default(), env(&[("KVSIDECAR_ENGINE_MODEL_ALIASES", value)])).unwrap();
        assert_eq!(config.engine.model_aliases, ["a", "b"], "{value}");
    }
}

#[test]
fn non_http_engine_url_rejected() {
    let overrides = Overrides { engine: Some("ftp://x".into()), ..Overrides::default() };
    let found = issues(load(&overrides, env(&[])));
    assert_eq!(found[0].path, "engine.url");
    assert_eq!(found[0].origin, "flag --engine");
}

#[test]
fn toml_syntax_error_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[server\n").unwrap();
    let overrides = Overrides { config_file: Some(path.clone()), ..Overrides::default() };
    match load(&overrides, env(&[])) {
        Err(ConfigError::Syntax { path: reported, .. }) => assert_eq!(reported, path),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn shipped_config_file_loads_and_matches_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/kvsidecar.toml");
    let shipped = load(&Overrides { config_file: Some(path), ..Overrides::default() }, env(&[])).unwrap();
    let defaults = load(&Overrides::default(), env(&[])).unwrap();
    assert_eq!(shipped.plugins.router.file, defaults.plugins.router.file);
    assert_eq!(shipped.plugins.deadline, defaults.plugins.deadline);
    assert_eq!(shipped.store.high_watermark, defaults.store.high_watermark);
    assert_eq!(shipped.plugins.router.config.get("imbalance").and_then(toml::Value::as_integer), Some(4));
}

#[test]
fn plugin_settings_come_from_file_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugins.toml");
    std::fs::write(&path, "[plugins.router]\nfile = \"/opt/r.wasm\"\non_failure = \"reject\"\n[plugins.router.config]\nimbalance = 2\n").unwrap();
    let overrides = Overrides { config_file: Some(path), ..Overrides::default() };
    let config = load(
        &overrides,
        env(&[("KVSIDECAR_PLUGINS_EVICTOR_FILE", "builtin"), ("KVSIDECAR_PLUGINS_ADMISSION_CONFIG", "{ min_tokens = 128 }"), ("KVSIDECAR_PLUGINS_DEADLINE", "20ms")]),
    )
    .unwrap();
    assert_eq!(config.plugins.router.file, Some(PathBuf::from("/opt/r.wasm")));
    assert_eq!(config.plugins.router.on_failure, crate::config::OnFailure::Reject);
    assert_eq!(config.plugins.router.config.get("imbalance").and_then(toml::Value::as_integer), Some(2));
    assert_eq!(config.plugins.evictor.file, None);
    assert_eq!(config.plugins.admission.config.get("min_tokens").and_then(toml::Value::as_integer), Some(128));
    assert_eq!(config.plugins.deadline, Duration::from_millis(20));
}

#[test]
fn bad_plugin_and_watermark_settings_are_reported() {
    let found = issues(load(
        &Overrides::default(),
        env(&[
            ("KVSIDECAR_PLUGINS_ROUTER_ON_FAILURE", "ignore"),
            ("KVSIDECAR_PLUGINS_ROUTER_COLOUR", "red"),
            ("KVSIDECAR_PLUGINS_DEADLINE", "0s"),
            ("KVSIDECAR_STORE_LOW_WATERMARK", "0.99"),
            ("KVSIDECAR_PLUGINS_EVICTOR_CONFIG", "not a table"),
        ]),
    ));
    let paths: Vec<&str> = found.iter().map(|issue| issue.path.as_str()).collect();
    for expected in ["plugins.router.on_failure", "plugins.router.colour", "plugins.deadline", "store.low_watermark", "plugins.evictor.config"] {
        assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
    }
}

#[test]
fn peer_settings_invalid_values_named() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("KVSIDECAR_PEERS_DNS", "http://peers.svc:9100")], "peers.dns"),
        (&[("KVSIDECAR_PEERS_ZSTD_LEVEL", "22")], "peers.zstd_level"),
        (&[("KVSIDECAR_PEERS_COMPRESSION", "gzip")], "peers.compression"),
        (&[("KVSIDECAR_PEERS_FORWARD_TIMEOUT", "0s")], "peers.forward_timeout"),
        (&[("KVSIDECAR_PEERS_TLS_CERT_FILE", "/etc/node.pem")], "peers.tls_key_file"),
        (&[("KVSIDECAR_PEERS_URLS", "https://10.0.0.7:9100")], "peers.urls"),
    ];
    for (variables, path) in cases {
        let found = issues(load(&Overrides::default(), env(variables)));
        assert!(found.iter().any(|issue| issue.path == path), "{variables:?}: {found:?}");
    }
    let tls = load(
        &Overrides::default(),
        env(&[
            ("KVSIDECAR_PEERS_TLS_CERT_FILE", "/etc/node.pem"),
            ("KVSIDECAR_PEERS_TLS_KEY_FILE", "/etc/node.key"),
            ("KVSIDECAR_PEERS_TLS_CA_FILE", "/etc/ca.pem"),
            ("KVSIDECAR_PEERS_URLS", "https://10.0.0.7:9100"),
            ("KVSIDECAR_REQUEST_SHARED_NAMESPACES", "docs,faq"),
        ]),
    )
    .unwrap();
    assert_eq!(tls.peers.scheme(), "https");
    assert_eq!(tls.request.shared_namespaces, ["docs", "faq"]);
}

#[test]
fn telemetry_settings_invalid_values_named() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("KVSIDECAR_TELEMETRY_OTLP_ENDPOINT", "collector:4317")], "telemetry.otlp_endpoint"),
        (&[("KVSIDECAR_TELEMETRY_OTLP_ENDPOINT", "https://collector:4317")], "telemetry.otlp_endpoint"),
        (&[("KVSIDECAR_TELEMETRY_OTLP_PROTOCOL", "thrift")], "telemetry.otlp_protocol"),
        (&[("KVSIDECAR_TELEMETRY_SAMPLING_RATIO", "1.5")], "telemetry.sampling_ratio"),
        (&[("KVSIDECAR_TELEMETRY_OTLP_HEADERS", "no-equals-sign")], "telemetry.otlp_headers"),
        (&[("KVSIDECAR_TELEMETRY_METRICS_INTERVAL", "100ms")], "telemetry.metrics_interval"),
    ];
    for (variables, path) in cases {
        let found = issues(load(&Overrides::default(), env(variables)));
        assert!(found.iter().any(|issue| issue.path == path), "{variables:?}: {found:?}");
    }
    let valid = load(
        &Overrides::default(),
        env(&[
            ("KVSIDECAR_TELEMETRY_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("KVSIDECAR_TELEMETRY_OTLP_PROTOCOL", "http"),
            ("KVSIDECAR_TELEMETRY_OTLP_HEADERS", "authorization=Bearer abc"),
            ("KVSIDECAR_TELEMETRY_SAMPLING_RATIO", "0.01"),
        ]),
    )
    .unwrap();
    assert_eq!(valid.telemetry.otlp_protocol, crate::config::OtlpProtocol::Http);
    assert_eq!(valid.telemetry.otlp_headers, ["authorization=Bearer abc"]);
    assert_eq!(valid.telemetry.sampling_ratio, 0.01);
}
