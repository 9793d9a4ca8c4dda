//! Rendering of the effective configuration as TOML, in the same spelling the loader accepts.

use toml::{Table, Value};

use super::{Config, FlashAttention, KvCacheType, LogFormat, PluginConfig};

fn text(value: impl ToString) -> Value {
    Value::String(value.to_string())
}

/// Writes a byte size exactly: in the largest binary unit that divides it, else in bytes.
fn size(value: super::ByteSize) -> Value {
    let bytes = value.as_u64();
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes > 0 && bytes.is_multiple_of(factor) {
            return text(format!("{}{unit}", bytes / factor));
        }
    }
    Value::Integer(i64::try_from(bytes).unwrap_or(i64::MAX))
}

fn duration(value: std::time::Duration) -> Value {
    text(humantime::format_duration(value))
}

fn cache_type(value: KvCacheType) -> Value {
    let name = match value {
        KvCacheType::F32 => "f32",
        KvCacheType::F16 => "f16",
        KvCacheType::Bf16 => "bf16",
        KvCacheType::Q8_0 => "q8_0",
        KvCacheType::Q4_0 => "q4_0",
        KvCacheType::Q4_1 => "q4_1",
        KvCacheType::Iq4Nl => "iq4_nl",
        KvCacheType::Q5_0 => "q5_0",
        KvCacheType::Q5_1 => "q5_1",
    };
    text(name)
}

fn section(entries: Vec<(&str, Value)>) -> Value {
    Value::Table(entries.into_iter().map(|(key, value)| (key.to_string(), value)).collect())
}

impl Config {
    /// Returns the configuration as a TOML document that `kvsidecar serve --config` accepts.
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        root.insert("server".into(), section(vec![
            ("listen", text(self.server.listen)),
            ("admin_listen", text(self.server.admin_listen)),
            ("max_body", size(self.server.max_body)),
            ("shutdown_grace", duration(self.server.shutdown_grace)),
            ("header_timeout", duration(self.server.header_timeout)),
            ("body_timeout", duration(self.server.body_timeout)),
        ]));
        let flash_attention = match self.engine.flash_attention {
            FlashAttention::On => "on",
            FlashAttention::Off => "off",
            FlashAttention::Auto => "auto",
        };
        root.insert("engine".into(), section(vec![
            ("url", text(&self.engine.url)),
            ("slot_dir", text(self.engine.slot_dir.display())),
            ("connect_timeout", duration(self.engine.connect_timeout)),
            ("response_timeout", duration(self.engine.response_timeout)),
            ("probe_interval", duration(self.engine.probe_interval)),
            ("cache_type_k", cache_type(self.engine.cache_type_k)),
            ("cache_type_v", cache_type(self.engine.cache_type_v)),
            ("flash_attention", text(flash_attention)),
            ("unified_kv", Value::Boolean(self.engine.unified_kv)),
            ("model_aliases", Value::Array(self.engine.model_aliases.iter().map(text).collect())),
        ]));
        root.insert("request".into(), section(vec![
            ("tenant_header", text(&self.request.tenant_header)),
            ("default_tenant", text(&self.request.default_tenant)),
            ("shared_namespaces", Value::Array(self.request.shared_namespaces.iter().map(text).collect())),
        ]));
        root.insert("prefix".into(), section(vec![("block_tokens", Value::Integer(i64::from(self.prefix.block_tokens.get())))]));
        root.insert("store".into(), section(vec![
            ("data_dir", text(self.store.data_dir.display())),
            ("capacity", size(self.store.capacity)),
            ("chunk_size", size(self.store.chunk_size)),
            ("max_snapshot", size(self.store.max_snapshot)),
            ("high_watermark", Value::Float(self.store.high_watermark)),
            ("low_watermark", Value::Float(self.store.low_watermark)),
        ]));
        root.insert("snapshot".into(), section(vec![
            ("min_tokens", Value::Integer(i64::from(self.snapshot.min_tokens))),
            ("restore_min_gain", Value::Integer(i64::from(self.snapshot.restore_min_gain))),
        ]));
        let format = match self.log.format {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        };
        root.insert("log".into(), section(vec![
            ("level", text(&self.log.level)),
            ("format", text(format)),
            ("log_prompts", Value::Boolean(self.log.log_prompts)),
        ]));
        let plugin = |plugin: &PluginConfig| {
            let file = plugin.file.as_ref().map(|file| file.display().to_string()).unwrap_or_else(|| "builtin".into());
            section(vec![
                ("file", text(file)),
                ("on_failure", text(plugin.on_failure.as_str())),
                ("config", Value::Table(plugin.config.clone())),
            ])
        };
        root.insert("plugins".into(), section(vec![
            ("dir", text(self.plugins.dir.display())),
            ("cache_dir", text(self.plugins.cache_dir.display())),
            ("deadline", duration(self.plugins.deadline)),
            ("memory_limit", size(self.plugins.memory_limit)),
            ("max_concurrent_calls", Value::Integer(i64::from(self.plugins.max_concurrent_calls))),
            ("watch", Value::Boolean(self.plugins.watch)),
            ("warn_interval", duration(self.plugins.warn_interval)),
            ("router", plugin(&self.plugins.router)),
            ("evictor", plugin(&self.plugins.evictor)),
            ("admission", plugin(&self.plugins.admission)),
        ]));
        let optional = |value: Option<String>| text(value.unwrap_or_default());
        root.insert("peers".into(), section(vec![
            ("listen", optional(self.peers.listen.map(|addr| addr.to_string()))),
            ("urls", Value::Array(self.peers.urls.iter().map(text).collect())),
            ("dns", optional(self.peers.dns.clone())),
            ("dns_interval", duration(self.peers.dns_interval)),
            ("token_file", optional(self.peers.token_file.as_ref().map(|path| path.display().to_string()))),
            ("health_interval", duration(self.peers.health_interval)),
            ("dead_after", duration(self.peers.dead_after)),
            ("journal_entries", Value::Integer(i64::from(self.peers.journal_entries))),
            ("index_blocks", Value::Integer(i64::from(self.peers.index_blocks))),
            ("compression", text(match self.peers.compression {
                crate::config::Compression::None => "none",
                crate::config::Compression::Zstd => "zstd",
            })),
            ("zstd_level", Value::Integer(i64::from(self.peers.zstd_level))),
            ("transfer_timeout", duration(self.peers.transfer_timeout)),
            ("forward_timeout", duration(self.peers.forward_timeout)),
            ("tls_cert_file", optional(self.peers.tls_cert_file.as_ref().map(|path| path.display().to_string()))),
            ("tls_key_file", optional(self.peers.tls_key_file.as_ref().map(|path| path.display().to_string()))),
            ("tls_ca_file", optional(self.peers.tls_ca_file.as_ref().map(|path| path.display().to_string()))),
            ("tls_server_name", optional(self.peers.tls_server_name.clone())),
        ]));
        let telemetry = &self.telemetry;
        root.insert("telemetry".into(), section(vec![
            ("otlp_endpoint", optional(telemetry.otlp_endpoint.clone())),
            ("otlp_protocol", text(telemetry.otlp_protocol.as_str())),
            ("otlp_timeout", duration(telemetry.otlp_timeout)),
            ("otlp_headers", Value::Array(telemetry.otlp_headers.iter().map(text).collect())),
            ("service_name", text(&telemetry.service_name)),
            ("traces", Value::Boolean(telemetry.traces)),
            ("sampling_ratio", Value::Float(telemetry.sampling_ratio)),
            ("span_queue", Value::Integer(i64::from(telemetry.span_queue))),
            ("metrics", Value::Boolean(telemetry.metrics)),
            ("metrics_interval", duration(telemetry.metrics_interval)),
            ("prometheus", Value::Boolean(telemetry.prometheus)),
        ]));
        let mut ledger = vec![
            ("enabled", Value::Boolean(self.ledger.enabled)),
            ("task_header", text(&self.ledger.task_header)),
            ("retention", duration(self.ledger.retention)),
            ("currency", text(&self.ledger.currency)),
            ("max_requests_per_task", Value::Integer(i64::from(self.ledger.max_requests_per_task))),
        ];
        if let Some(price) = &self.ledger.price {
            ledger.push(("price", Value::Table(super::ledger::price_table(price))));
        }
        let models = self.ledger.models.iter().map(|(model, price)| (model.clone(), Value::Table(super::ledger::price_table(price)))).collect();
        ledger.push(("models", Value::Table(models)));
        root.insert("ledger".into(), section(ledger));
        toml::to_string(&root).unwrap_or_default()
    }
}
