//! Provider adapters through real processes: an Azure OpenAI-kind provider
//! behind the same OpenAI surface.

mod common;

use common::*;
use serde_json::json;

fn azure(mock: &Mock) -> GatewayConfig {
    let mut config = GatewayConfig::new(mock);
    config.providers = vec![format!(
        "  - {{ name: azure, kind: azure, base_url: \"http://127.0.0.1:{}\", api_key: \"{PROVIDER_KEY}\", api_version: \"2024-10-21\" }}",
        mock.port
    )];
    config.models = "
  - name: gpt-4o-mini
    targets: [{ provider: azure, model: my-4o-mini }]
  - name: text-embedding-3-small
    targets: [{ provider: azure, model: my-embeddings }]
"
    .into();
    config
}

#[test]
fn azure_chat_uses_deployment_urls_and_the_api_key_header() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&azure(&mock));
    let resp = gw.post_json(
        "/v1/chat/completions",
        TENANT_KEY,
        &chat("gpt-4o-mini", false),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["object"], "chat.completion");
    let seen = &mock.requests()[0];
    assert_eq!(
        seen["path"],
        "/openai/deployments/my-4o-mini/chat/completions"
    );
    assert_eq!(seen["query"], "api-version=2024-10-21");
    assert_eq!(seen["headers"]["api-key"], PROVIDER_KEY);
    assert!(
        seen["headers"].get("authorization").is_none(),
        "{}",
        seen["headers"]
    );
}

#[test]
fn azure_streams_and_embeddings_work_with_accounting() {
    let mock = Mock::start(&["--api-key", PROVIDER_KEY]);
    let gw = Gateway::start(&azure(&mock));
    let mut events = Vec::new();
    let status = read_sse(
        gw.port,
        TENANT_KEY,
        &chat("gpt-4o-mini", true),
        |data, _| events.push(data.to_string()),
    );
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "the usage the gateway asked for is removed"
    );
    let resp = gw.post_json(
        "/v1/embeddings",
        TENANT_KEY,
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        mock.requests()[1]["path"],
        "/openai/deployments/my-embeddings/embeddings"
    );
    let tokens = metric_value(
        &gw.metrics(),
        r#"runestone_tokens_total{kind="completion",model="gpt-4o-mini",tenant="acme"}"#,
    );
    assert_eq!(tokens, mock.stats()["completion_tokens"].as_f64().unwrap());
}

#[test]
fn an_azure_provider_needs_an_api_version() {
    let dir = std::env::temp_dir().join(format!("runestone-azure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "server: { listen: \"127.0.0.1:1\" }\nproviders:\n  - { name: a, kind: azure, base_url: \"https://x.openai.azure.com\" }\n  - { name: b, base_url: \"https://api.openai.com/v1\", api_version: \"2024-10-21\" }\nmodels:\n  - { name: m, targets: [{ provider: a }] }\ntenants: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runestone"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers[0].api_version: an azure provider needs api_version"),
        "{stderr}"
    );
    assert!(
        stderr.contains("providers[1].api_version: only azure providers take api_version"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
