use super::*;

fn parse_chat(body: &str) -> Result<CompletionRequest, ApiError> {
    parse(Endpoint::ChatCompletions, body.as_bytes())
}

fn parse_completion(body: &str) -> Result<CompletionRequest, ApiError> {
    parse(Endpoint::Completions, body.as_bytes())
}

#[test]
fn chat_request_fields_extracted() {
    let parsed = parse_chat(r#"{"model":"m","stream":true,"cache_salt":"s1","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
    assert_eq!(parsed.model.as_deref(), Some("m"));
    assert!(parsed.stream);
    assert_eq!(parsed.cache_salt.as_deref(), Some("s1"));
    assert!(parsed.body.get("cache_salt").is_none(), "cache_salt is not forwarded");
    assert!(parsed.single_prompt);
}

#[test]
fn malformed_json_rejected() {
    let error = parse_chat("{\"messages\": [").unwrap_err();
    assert_eq!(error.status, http::StatusCode::BAD_REQUEST);
    assert_eq!(error.code, "invalid_json");
}

#[test]
fn invalid_utf8_rejected_with_offset() {
    let error = parse(Endpoint::Completions, b"{\"prompt\": \"a\xff\"}").unwrap_err();
    assert_eq!(error.code, "invalid_utf8");
    assert!(error.message.contains("byte 13"), "{}", error.message);
}

#[test]
fn missing_messages_named() {
    let error = parse_chat(r#"{"model":"m"}"#).unwrap_err();
    assert_eq!(error.code, "missing_field");
    assert_eq!(error.param.as_deref(), Some("messages"));
}

#[test]
fn user_message_without_content_named() {
    let error = parse_chat(r#"{"messages":[{"role":"user"}]}"#).unwrap_err();
    assert_eq!(error.code, "missing_field");
    assert_eq!(error.param.as_deref(), Some("messages[0].content"));
    assert!(parse_chat(r#"{"messages":[{"role":"assistant","tool_calls":[]}]}"#).is_ok());
}

#[test]
fn message_without_role_named() {
    let error = parse_chat(r#"{"messages":[{"content":"x"}]}"#).unwrap_err();
    assert_eq!(error.param.as_deref(), Some("messages[0].role"));
}

#[test]
fn wrong_types_named() {
    let cases = [
        (r#"{"prompt":"x","stream":"yes"}"#, "stream"),
        (r#"{"prompt":"x","model":7}"#, "model"),
        (r#"{"prompt":{"a":1}}"#, "prompt"),
        (r#"{"prompt":"x","id_slot":"0"}"#, "id_slot"),
        (r#"{"prompt":"x","cache_salt":1}"#, "cache_salt"),
    ];
    for (body, field) in cases {
        let error = parse_completion(body).unwrap_err();
        assert_eq!(error.code, "invalid_type", "{body}");
        assert_eq!(error.param.as_deref(), Some(field), "{body}");
    }
}

#[test]
fn missing_prompt_named() {
    let error = parse_completion(r#"{"max_tokens":3}"#).unwrap_err();
    assert_eq!(error.param.as_deref(), Some("prompt"));
}

#[test]
fn negative_token_id_rejected() {
    let error = parse_completion(r#"{"prompt":[1,-5]}"#).unwrap_err();
    assert_eq!(error.code, "invalid_value");
}

#[test]
fn prompt_shapes_classified() {
    assert!(parse_completion(r#"{"prompt":[1,2,3]}"#).unwrap().single_prompt);
    assert!(parse_completion(r#"{"prompt":["a",2,3]}"#).unwrap().single_prompt);
    assert!(!parse_completion(r#"{"prompt":["a","b"]}"#).unwrap().single_prompt);
    assert!(!parse_completion(r#"{"prompt":[[1,2],[3]]}"#).unwrap().single_prompt);
}

#[test]
fn any_slot_marker_accepted() {
    assert_eq!(parse_completion(r#"{"prompt":"x","id_slot":-1}"#).unwrap().requested_slot, None);
    assert_eq!(parse_completion(r#"{"prompt":"x","id_slot":1}"#).unwrap().requested_slot, Some(1));
    assert_eq!(parse_completion(r#"{"prompt":"x","id_slot":-2}"#).unwrap_err().param.as_deref(), Some("id_slot"));
}

#[test]
fn odd_bodies_never_panic() {
    let bodies: [&[u8]; 12] = [
        b"",
        b"null",
        b"\"text\"",
        b"{\"messages\": [null]}",
        b"{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
        b"{\"prompt\": [1.5]}",
        b"{\"prompt\": [true]}",
        b"{\"prompt\": 18446744073709551616}",
        b"{\"prompt\": [18446744073709551615]}",
        b"{\"prompt\": \"x\", \"id_slot\": 1e40}",
        b"\xef\xbb\xbf{}",
        b"{\"prompt\": \"\\ud800\"}",
    ];
    for body in bodies {
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::NativeCompletion] {
            if let Err(error) = parse(endpoint, body) {
                assert!(error.status.is_client_error(), "{}", String::from_utf8_lossy(body));
            }
        }
    }
}
