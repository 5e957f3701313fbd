//! The policy DNS server's answers. The bridge inside the namespace passes
//! every question it receives (UDP or TCP, on port 53) to `dns.sock` in
//! DNS-over-TCP framing (RFC 1035 §4.2.2: a two-byte length before each
//! message), after one line naming the asking socket's address.
//!
//! | question | answer |
//! | --- | --- |
//! | `A` / `AAAA` for a name the policy would let a connection reach | the name's synthetic address ([`SyntheticNames`]) |
//! | another type for such a name (`HTTPS`, `TXT`, `MX`, …) | no records (`NOERROR`, empty) |
//! | any type for a denied or unknown name | `REFUSED`, recorded by the stack (protocol `dns`) |
//! | `PTR`, `ANY`, a class other than `IN`, more or fewer than one question, an opcode other than `QUERY` | `REFUSED` |
//! | bytes that do not parse as a query | `FORMERR` (when an id can be read), else nothing |
//!
//! Nothing is ever forwarded: no packet of the child's reaches a resolver,
//! so labels cannot carry data out. The proxy resolves the real name itself
//! when a connection to the synthetic address comes, after the policy.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use portcullis_middleware::target::Host;
use portcullis_middleware::{Protocol, Target};

use super::names::SyntheticNames;
use crate::kit::{Ingress, RequestModel};

/// How long an answer is cached: the map holds for the whole run.
const TTL: u32 = 300;

/// Serves `dns.sock` until the proxy stops.
pub(crate) async fn serve(
    listener: UnixListener,
    ingress: Ingress,
    peer: super::BridgePeer,
    names: Arc<SyntheticNames>,
) {
    super::accept_each(
        listener,
        ingress,
        peer,
        super::DNS_SOCKET,
        move |stream, ingress| {
            let names = names.clone();
            async move {
                let guard = ingress.open("DNS questions from the isolated command");
                if let Err(error) = serve_one(stream, &ingress, &names).await {
                    tracing::debug!(%error, "DNS connection from the bridge ended");
                }
                drop(guard);
            }
        },
    )
    .await;
}

async fn serve_one(
    stream: tokio::net::UnixStream,
    ingress: &Ingress,
    names: &SyntheticNames,
) -> std::io::Result<()> {
    let mut stream = stream;
    let line = super::read_line(&mut stream)
        .await
        .map_err(std::io::Error::other)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let client: SocketAddr = line
        .trim_end()
        .parse()
        .map_err(|_| std::io::Error::other("the bridge's first line is not an address"))?;
    loop {
        let length = match read.read_u16().await {
            Ok(length) => usize::from(length),
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        };
        let mut question = vec![0; length];
        read.read_exact(&mut question).await?;
        let Some(answer) = answer(&question, client, ingress, names).await else {
            continue;
        };
        let Ok(length) = u16::try_from(answer.len()) else {
            continue;
        };
        write.write_all(&length.to_be_bytes()).await?;
        write.write_all(&answer).await?;
    }
}

/// The answer to one DNS message, or `None` when not even an id could be
/// read from it.
pub(crate) async fn answer(
    question: &[u8],
    client: SocketAddr,
    ingress: &Ingress,
    names: &SyntheticNames,
) -> Option<Vec<u8>> {
    let message = match Message::from_vec(question) {
        Ok(message) => message,
        Err(_) => {
            let id = u16::from_be_bytes([*question.first()?, *question.get(1)?]);
            return reply(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
        }
    };
    let id = message.metadata.id;
    let refuse = |code| reply(Message::error_msg(id, message.metadata.op_code, code));
    if message.metadata.message_type != MessageType::Query
        || message.metadata.op_code != OpCode::Query
    {
        return refuse(ResponseCode::Refused);
    }
    let [query] = message.queries.as_slice() else {
        return refuse(ResponseCode::Refused);
    };
    let kind = query.query_type();
    if query.query_class() != DNSClass::IN || matches!(kind, RecordType::PTR | RecordType::ANY) {
        tracing::debug!(name = %query.name(), ?kind, "DNS question refused by its type");
        return refuse(ResponseCode::Refused);
    }
    let written = query.name().to_ascii();
    let Ok(host @ Host::Name(_)) = Host::parse(written.trim_end_matches('.')) else {
        tracing::info!(name = %written.escape_debug(), "DNS question for a name that is not a host name: refused");
        return refuse(ResponseCode::Refused);
    };
    let name = host.to_string();
    let model = RequestModel::new(Target::host(host, 0), Protocol::Dns, client);
    let allowed = match model.connect() {
        Ok(request) => ingress.call(request).await.is_ok(),
        Err(_) => false,
    };
    if !allowed {
        // The stack recorded it (protocol `dns`); the child learns nothing.
        return refuse(ResponseCode::Refused);
    }
    let (v4, v6) = match names.addresses(&name) {
        Ok(addresses) => addresses,
        Err(full) => {
            if full.worth_logging() {
                tracing::warn!(
                    refused = full.refused,
                    "the policy DNS server has given out its {} names; new names are answered SERVFAIL ({} so far, the latest {}; logged at 1, 10, 100, …)",
                    super::names::MAX_NAMES,
                    full.refused,
                    name.escape_debug(),
                );
            }
            return refuse(ResponseCode::ServFail);
        }
    };
    let mut response = Message::response(id, OpCode::Query);
    response.metadata.recursion_desired = message.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(query.clone());
    let record = match kind {
        RecordType::A => Some(RData::A(A(v4))),
        RecordType::AAAA => Some(RData::AAAA(AAAA(v6))),
        _ => None,
    };
    if let Some(rdata) = record {
        response.add_answer(Record::from_rdata(query.name().clone(), TTL, rdata));
    }
    reply(response)
}

fn reply(message: Message) -> Option<Vec<u8>> {
    message.to_vec().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use portcullis_middleware::{NetworkPolicy, PolicyHandle};
    use std::net::Ipv4Addr;

    fn question(id: u16, questions: &[(&str, RecordType)]) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        for (name, kind) in questions {
            message.add_query(Query::query(Name::from_ascii(name).unwrap(), *kind));
        }
        message.to_vec().unwrap()
    }

    async fn ask(ingress: &Ingress, names: &SyntheticNames, bytes: &[u8]) -> Option<Message> {
        let client = SocketAddr::from(([127, 0, 0, 1], 5353));
        answer(bytes, client, ingress, names)
            .await
            .map(|bytes| Message::from_vec(&bytes).unwrap())
    }

    #[tokio::test]
    async fn questions_get_what_the_policy_says_and_nothing_is_forwarded() {
        let policy = NetworkPolicy::builder()
            .allow("allowed.test")
            .unwrap()
            .deny("denied.allowed.test")
            .unwrap()
            // PTR is refused by its type, even for a name the policy allows.
            .allow("**.arpa")
            .unwrap()
            .build();
        // A resolver that would fail the test if anything were resolved.
        let resolver: Arc<dyn crate::resolve::Resolve> =
            Arc::new(|name: &str| -> crate::resolve::ResolveFuture {
                panic!("a DNS question made the proxy resolve {name}")
            });
        let proxy = crate::Proxy::builder()
            .policy(PolicyHandle::new(policy))
            .resolver(resolver)
            .start()
            .await
            .unwrap();
        let ingress = proxy.ingress();
        let names = SyntheticNames::default();

        let a = ask(
            &ingress,
            &names,
            &question(1, &[("allowed.test.", RecordType::A)]),
        )
        .await
        .unwrap();
        assert_eq!(a.metadata.id, 1);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        let (v4, v6) = names.addresses("allowed.test").unwrap();
        assert_eq!(a.answers[0].data, RData::A(A(v4)));
        let aaaa = ask(
            &ingress,
            &names,
            &question(2, &[("Allowed.TEST", RecordType::AAAA)]),
        )
        .await
        .unwrap();
        assert_eq!(aaaa.answers[0].data, RData::AAAA(AAAA(v6)));
        // Another type for an allowed name: no records, no error.
        let https = ask(
            &ingress,
            &names,
            &question(3, &[("allowed.test.", RecordType::HTTPS)]),
        )
        .await
        .unwrap();
        assert_eq!(https.metadata.response_code, ResponseCode::NoError);
        assert!(https.answers.is_empty());

        let refused = [
            question(4, &[("denied.allowed.test.", RecordType::A)]),
            question(5, &[("unknown.test.", RecordType::AAAA)]),
            question(6, &[("1.0.0.127.in-addr.arpa.", RecordType::PTR)]),
            question(7, &[("allowed.test.", RecordType::ANY)]),
            question(
                8,
                &[
                    ("allowed.test.", RecordType::A),
                    ("other.test.", RecordType::A),
                ],
            ),
            question(9, &[]),
        ];
        for bytes in &refused {
            let answer = ask(&ingress, &names, bytes).await.unwrap();
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::Refused,
                "{answer:?}"
            );
            assert!(answer.answers.is_empty());
        }
        // Bytes that are not a query: FORMERR when an id can be read.
        let bad = ask(&ingress, &names, &[0x12, 0x34, 0xff]).await.unwrap();
        assert_eq!(bad.metadata.id, 0x1234);
        assert_eq!(bad.metadata.response_code, ResponseCode::FormErr);
        assert!(ask(&ingress, &names, &[0x12]).await.is_none());
        // Only the allowed name was given an address.
        assert_eq!(names.name(Ipv4Addr::new(198, 18, 0, 2).into()), None);
        proxy.shutdown(std::time::Duration::ZERO).await;
    }
}
