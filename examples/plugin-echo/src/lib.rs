//! The smallest batchbox plugin: it answers each request with the request itself, and with the
//! token ids the tenant's model gives its body, to show a call to the host.

use batchbox_sdk::{Level, Plugin, Request, Response, host, json};

struct Echo;

impl Plugin for Echo {
    // The tenant's `config` from the server's YAML, as JSON. Echo has no settings; a plugin that
    // has some parses them here, so that a bad config stops startup instead of every request.
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    // Every request gets a fresh instance (unless its tenant sets `reuse_instances`): nothing kept
    // here outlives the response.
    fn handle(request: Request) -> Response {
        // The body arrives as bytes; the tokenizer takes text.
        let text = String::from_utf8_lossy(&request.body).into_owned();

        // The host owns the model, so tokenizing is a host call. It takes a batch (one
        // encoding comes back per text, in order) because each call crosses the sandbox.
        let ids = match host::tokenize(std::slice::from_ref(&text)) {
            Ok(mut encodings) => encodings.remove(0).ids,
            // A refused call (a tenant quota, say) becomes the HTTP answer it stands for.
            Err(error) => return error.into_response(),
        };
        // One line in the host's log, which tags it with the tenant and the request's id.
        host::log(Level::Info, &format!("echoing {} bytes as {} tokens", request.body.len(), ids.len()));

        json(
            200,
            &serde_json::json!({
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "headers": request.headers,
                "body": text,
                "ids": ids,
            }),
        )
    }
}

// `GET /openapi.json` lists the echo's routes without a description of their own.
impl batchbox_sdk::Describe for Echo {
    fn describe() -> String {
        String::new()
    }
}

// Exports `Echo` as the component's `batchbox:plugin/handler` and `api`, which the host calls.
batchbox_sdk::export_plugin!(Echo);
