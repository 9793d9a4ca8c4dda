//! The official OpenAI Python SDK, streaming and not, through the sidecar.

use std::process::Command;

use kvsidecar_tests::{Engine, Sidecar, Workspace, paths};

const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": "tell me about the cache " * 40}]
whole = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=12, temperature=0)
raw = client.chat.completions.with_raw_response.create(model=sys.argv[2], messages=messages, max_tokens=12, temperature=0)
again = raw.parse()
pieces = []
for chunk in client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=12, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
legacy = client.completions.create(model=sys.argv[2], prompt="the cache", max_tokens=4, temperature=0)
print(json.dumps({
    "whole": whole.choices[0].message.content,
    "again": again.choices[0].message.content,
    "again_cached_header": raw.headers.get("x-kvsidecar-cached-tokens"),
    "prompt_tokens": whole.usage.prompt_tokens,
    "streamed": "".join(pieces),
    "stream_chunks": len(pieces),
    "legacy": legacy.choices[0].text,
}))
"#;

#[tokio::test]
async fn openai_python_sdk_streams_and_not() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let model = sidecar.stats().await["engine"]["model"].as_str().unwrap().to_string();

    let python = paths().python;
    let url = sidecar.url.clone();
    let output = tokio::task::spawn_blocking(move || Command::new(python).args(["-c", SCRIPT, &url, &model]).output()).await.unwrap().unwrap();
    assert!(output.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(result["whole"], result["again"], "{result}");
    assert_eq!(result["whole"], result["streamed"], "{result}");
    assert!(result["stream_chunks"].as_u64().unwrap() > 1, "{result}");
    let cached: u64 = result["again_cached_header"].as_str().unwrap().parse().unwrap();
    assert!(cached + 1 >= result["prompt_tokens"].as_u64().unwrap(), "{result}");
    assert!(result["legacy"].is_string(), "{result}");
}
