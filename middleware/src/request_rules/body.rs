//! Bodies that name a method: forms, multipart and JSON with `_method`,
//! and the mark that has the connector judge them.

use std::fmt;

use http::Request;

use crate::error::{Blocked, BoxError, Reason, Source};
use crate::request::RequestInfo;

use super::block::RuleBlock;
use super::call::{audited_of, refusal_of};
use super::entry::{Asked, Call};
use super::jsonrpc::body_messages;
use super::{Refusal, RequestRules, RuleVerdict};

/// How a request body names fields, when frameworks read a `_method`
/// field from it as the real method (Rails and Symfony from forms, Laravel
/// from forms and JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyForm {
    /// `application/x-www-form-urlencoded`.
    UrlEncoded,
    /// `multipart/form-data` (the boundary is in the `Content-Type`).
    Multipart,
    /// `application/json` or any `…+json`.
    Json,
}

impl BodyForm {
    /// The form of a body with these headers: judged on every
    /// `Content-Type` value by its media type, ignoring case and
    /// parameters; `None` when none is a form or JSON.
    pub fn of(headers: &http::HeaderMap) -> Option<BodyForm> {
        crate::inspect::media_types(headers)
            .filter_map(|essence| match essence.as_str() {
                "application/x-www-form-urlencoded" => Some(BodyForm::UrlEncoded),
                "multipart/form-data" => Some(BodyForm::Multipart),
                "application/json" => Some(BodyForm::Json),
                other if other.starts_with("application/") && other.ends_with("+json") => {
                    Some(BodyForm::Json)
                }
                _ => None,
            })
            .next()
    }
}

/// The methods an `application/x-www-form-urlencoded` body asks for with a
/// `_method` field (the name read as PHP and the frameworks read it).
pub fn method_overrides_in_form(body: &[u8]) -> Vec<String> {
    let body = String::from_utf8_lossy(body);
    crate::inspect::form_parameters(&body)
        .filter(|(name, _)| crate::inspect::is_method_override_name(name))
        .map(|(_, value)| value)
        .collect()
}

/// The methods a JSON body asks for with a top-level `_method` key (each
/// one, when the key is repeated; each string of an array; a value that is
/// not a string as a non-method, which no `allow` entry holds). A body that
/// is not a JSON object names none: no framework reads a field from it.
pub fn method_overrides_in_json(body: &[u8]) -> Vec<String> {
    struct Overrides(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Overrides {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Overrides;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Overrides, A::Error> {
                    let mut found = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        let value: serde_json::Value = map.next_value()?;
                        if !crate::inspect::is_method_override_name(&key) {
                            continue;
                        }
                        match value {
                            serde_json::Value::String(method) => found.push(method),
                            serde_json::Value::Array(items) => {
                                found.extend(items.into_iter().map(|item| match item {
                                    serde_json::Value::String(method) => method,
                                    _ => String::new(),
                                }))
                            }
                            _ => found.push(String::new()),
                        }
                    }
                    Ok(Overrides(found))
                }
            }
            deserializer.deserialize_map(Visitor)
        }
    }
    serde_json::from_slice::<Overrides>(body)
        .map(|overrides| overrides.0)
        .unwrap_or_default()
}

/// The mark the request-rules layer puts on a request it let through to a
/// host whose rules name methods, when the request carries a form,
/// multipart or JSON body ([`BodyForm`]): frameworks read a `_method` field
/// there as the real method, so the body has not been judged yet. The
/// innermost service must read the body (bounded), find the methods it
/// names ([`method_overrides_in_form`], [`method_overrides_in_json`], the
/// `_method` parts of a multipart body) and [`decide`](VerifyBodyMethod::decide)
/// before anything is sent, and [`refuse_unread`](VerifyBodyMethod::refuse_unread)
/// a body it cannot read within its bound; portcullis's connector does.
#[derive(Debug, Clone)]
pub struct VerifyBodyMethod {
    pub(super) rules: RequestRules,
    pub(super) form: BodyForm,
    /// Some block names `jsonrpc`: the body's calls are judged too.
    pub(super) calls: bool,
}

impl VerifyBodyMethod {
    /// How the body names its fields.
    pub fn form(&self) -> &BodyForm {
        &self.form
    }

    /// Whether the rules judge the body's JSON-RPC calls (an entry names
    /// `jsonrpc`): then [`decide_body`](Self::decide_body) must be given
    /// the body.
    pub fn reads_calls(&self) -> bool {
        self.calls
    }

    /// The request judged again with the methods its body names: `Err`
    /// with the refusal, `Ok(Some(_))` with a would-be refusal to record
    /// (audit mode), `Ok(None)` to let it go on. Without the body, an
    /// entry that names `jsonrpc` matches no call (fail closed): use
    /// [`decide_body`](Self::decide_body) when [`reads_calls`](Self::reads_calls).
    pub fn decide<B>(
        &self,
        request: &Request<B>,
        body_methods: &[String],
    ) -> Result<Option<Blocked>, BoxError> {
        self.decide_calls(request, body_methods, None)
    }

    /// As [`decide`](Self::decide), with the body (its content coding
    /// undone) for its JSON-RPC calls: a batch is judged call by call,
    /// each needing an `allow` entry, any one refused by a `deny` entry.
    pub fn decide_body<B>(
        &self,
        request: &Request<B>,
        body_methods: &[String],
        body: &[u8],
    ) -> Result<Option<Blocked>, BoxError> {
        let calls = if self.calls {
            body_messages(request.headers(), body)
        } else {
            None
        };
        self.decide_calls(request, body_methods, calls.as_deref())
    }

    fn decide_calls<B>(
        &self,
        request: &Request<B>,
        body_methods: &[String],
        calls: Option<&[super::JsonMessage]>,
    ) -> Result<Option<Blocked>, BoxError> {
        let info = RequestInfo::from_request(request)?;
        let judged: Vec<Call<'_>> = match calls {
            Some(calls) => calls.iter().map(Call::One).collect(),
            None => vec![Call::None],
        };
        let mut audited = None;
        for call in judged {
            let mut asked = Asked::of(request).with_body_overrides(body_methods);
            asked.call = call;
            match self.rules.verdict(&info.target, &asked) {
                RuleVerdict::NoRules | RuleVerdict::Allowed(_) => {}
                RuleVerdict::Refused(refusal) => return Err(refusal_of(&info, refusal).into()),
                RuleVerdict::Audited(refusal) => {
                    audited.get_or_insert_with(|| audited_of(&info, refusal));
                }
            }
        }
        Ok(audited)
    }

    /// The refusal of a request whose body could not be judged (`why`: over
    /// the bound, or not readable as its `Content-Type` says).
    pub fn refuse_unread<B>(&self, request: &Request<B>, why: &str) -> BoxError {
        let info = match RequestInfo::from_request(request) {
            Ok(info) => info,
            Err(error) => return error.into(),
        };
        let names: Vec<String> = self
            .rules
            .blocks_for(&info.target)
            .iter()
            .filter(|(_, block)| !block.read_only)
            .map(|(_, block)| format!("{} ({})", block.name, block.host))
            .collect();
        let what = if self.calls {
            "judge JSON-RPC calls"
        } else {
            "name methods, and a form or JSON body can name another one (_method)"
        };
        let message = format!(
            "portcullis refused {} {}: its request rules ({}) {what}, but this body could not be judged: {why}; send a body of at most 16 MiB that parses as its Content-Type says",
            info.method.as_str().escape_debug(),
            info.target,
            names.join(", ")
        );
        refusal_of(
            &info,
            Refusal {
                reason: Reason::RuleNotMatched,
                source: Source::RequestRules,
                rule: Some(if self.calls {
                    format!(
                        "{}: its body's calls could not be judged: {why}",
                        names.join(", ")
                    )
                } else {
                    format!(
                        "{}: its body could name another method (_method) and {why}",
                        names.join(", ")
                    )
                }),
            },
        )
        // Written: the fix is the body's, not a rules entry's.
        .with_message(message)
        .into()
    }
}

/// Whether a request the rules let through must have its body judged:
/// it carries a form or JSON body and some block covering it names methods.
pub(super) fn body_method_mark<B>(
    rules: &RequestRules,
    blocks: &[(usize, &RuleBlock)],
    request: &Request<B>,
) -> Option<VerifyBodyMethod> {
    let names_methods = blocks.iter().any(|(_, block)| {
        !block.read_only
            && block
                .allow
                .iter()
                .chain(&block.deny)
                .any(|entry| entry.methods.is_some())
    });
    let calls = blocks
        .iter()
        .any(|(_, block)| !block.read_only && block.reads_messages());
    if !(names_methods || calls) || !crate::inspect::carries_body(request) {
        return None;
    }
    // A JSON-RPC body is read whatever its Content-Type says: servers
    // parse what they are sent.
    let form = match BodyForm::of(request.headers()) {
        Some(form) => form,
        None if calls => BodyForm::Json,
        None => return None,
    };
    Some(VerifyBodyMethod {
        rules: rules.clone(),
        form,
        calls,
    })
}
