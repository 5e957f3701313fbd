//! After a `101` the secret scan covers: each WebSocket message the client
//! sends is held until [`ScanFrames`] has judged it
//! ([`ScanFrames::judge`]), then sent on as it came, byte for byte.
//!
//! [`ScannedFrames`] wraps the client's side of the relay. It parses every
//! frame (the checks of [`FramesOnly`](super::websocket::FramesOnly)
//! apply), unmasks the payloads, joins a fragmented message, and undoes
//! permessage-deflate (RFC 7692) when the handshake's response agreed it —
//! one inflater for the connection, so context takeover is followed; a
//! compressed message without that agreement cannot be read. Control
//! frames (ping, pong, close) are judged too, and while a message is held
//! they wait behind it, so the origin sees them in the order sent.
//!
//! Bounded: at most the scan's limit of a message is held, and at most
//! that limit is inflated; a larger message is judged as not inspected
//! (under `audit` it is recorded and its bytes go on unread). A refusal
//! ends the read with an error, which closes both sides: nothing of the
//! message leaves.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use portcullis_middleware::ScanFrames;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::websocket::{refuse_header, Sender, MAX_HEADER};

/// The tail a permessage-deflate sender strips from each message.
const DEFLATE_TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Bytes read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

/// The frame whose payload is being read.
#[derive(Debug)]
struct Frame {
    opcode: OpCode,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes read so far (the mask's phase).
    read: u64,
    left: u64,
}

/// The client's messages, followed and judged; see the [module docs](self).
pub(crate) struct Messages {
    judge: ScanFrames,
    inflater: Option<Decompress>,
    /// The bytes read and not yet handed on: `held[start..ready]` are
    /// judged and free to go, `held[ready..parsed]` belong to a message
    /// still being read, `held[parsed..]` to a frame header not yet whole.
    held: Vec<u8>,
    start: usize,
    ready: usize,
    parsed: usize,
    frame: Option<Frame>,
    /// The current data message, unmasked (still compressed when
    /// `compressed`).
    message: Vec<u8>,
    control: Vec<u8>,
    in_message: bool,
    compressed: bool,
    /// Let on unread (an audit of a message too large): its frames are
    /// still followed, its payload no longer held.
    unread: bool,
    /// Why the connection must close, once what was judged before is
    /// handed on.
    failed: Option<io::Error>,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages")
            .field("held", &(self.held.len() - self.start))
            .field("in_message", &self.in_message)
            .finish()
    }
}

impl Messages {
    /// `deflate`: the handshake's response agreed permessage-deflate.
    pub(crate) fn new(judge: ScanFrames, deflate: bool) -> Messages {
        Messages {
            judge,
            inflater: deflate.then(|| Decompress::new(false)),
            held: Vec::new(),
            start: 0,
            ready: 0,
            parsed: 0,
            frame: None,
            message: Vec::new(),
            control: Vec::new(),
            in_message: false,
            compressed: false,
            unread: false,
            failed: None,
        }
    }

    /// Takes bytes read from the client. When they cannot go on, what was
    /// judged before them still does, and then [`failed`](Self::failed)
    /// says why the connection closes.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            // What was handed on goes: at most once per message released.
            self.held.drain(..self.start);
            self.ready -= self.start;
            self.parsed -= self.start;
            self.start = 0;
        }
        self.held.extend_from_slice(bytes);
        if let Err(why) = self.advance() {
            // Nothing past the last judged byte leaves.
            self.held.truncate(self.ready);
            self.parsed = self.ready;
            self.failed = Some(io::Error::new(io::ErrorKind::InvalidData, why));
        }
    }

    /// Why the connection closes, once [`judged`](Self::judged) is empty.
    pub(crate) fn failed(&mut self) -> Option<io::Error> {
        if self.judged().is_empty() {
            self.failed.take()
        } else {
            None
        }
    }

    /// The judged bytes, to hand on.
    pub(crate) fn judged(&self) -> &[u8] {
        self.held.get(self.start..self.ready).unwrap_or_default()
    }

    /// `n` of the judged bytes were handed on.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.ready);
    }

    /// Whether a message is held unfinished (the client stopped mid-way).
    pub(crate) fn holds_unfinished(&self) -> bool {
        self.parsed > self.ready || self.held.len() > self.parsed
    }

    fn advance(&mut self) -> Result<(), String> {
        loop {
            let Some(frame) = self.frame.as_mut() else {
                if !self.header()? {
                    return Ok(());
                }
                continue;
            };
            let available = self.held.len() - self.parsed;
            let take = usize::try_from(frame.left)
                .unwrap_or(usize::MAX)
                .min(available);
            if take == 0 && frame.left > 0 {
                return Ok(());
            }
            let end = self.parsed + take;
            let payload = self.held.get(self.parsed..end).unwrap_or_default();
            let into = match frame.opcode {
                OpCode::Control(_) => Some(&mut self.control),
                OpCode::Data(_) if self.unread => None,
                OpCode::Data(_) => Some(&mut self.message),
            };
            if let Some(into) = into {
                let from = into.len();
                into.extend_from_slice(payload);
                if let Some(mask) = frame.mask {
                    for (i, byte) in into.iter_mut().skip(from).enumerate() {
                        let phase = ((frame.read % 4) as usize + i) % 4;
                        *byte ^= mask.get(phase).copied().unwrap_or(0);
                    }
                }
            } else if self.compressed {
                // Let on unread, but inflated all the same: the next
                // message may refer back to it (context takeover).
                let mut plain = Vec::new();
                let mut unmasked = payload.to_vec();
                if let Some(mask) = frame.mask {
                    for (i, byte) in unmasked.iter_mut().enumerate() {
                        let phase = ((frame.read % 4) as usize + i) % 4;
                        *byte ^= mask.get(phase).copied().unwrap_or(0);
                    }
                }
                if let Some(inflater) = self.inflater.as_mut() {
                    let _ = inflate(inflater, &unmasked, &mut plain, 0);
                }
            }
            frame.read += take as u64;
            frame.left -= take as u64;
            self.parsed = end;
            if self.unread {
                self.ready = self.parsed;
            }
            if frame.left > 0 {
                self.bounded()?;
                return Ok(());
            }
            let frame = self.frame.take();
            if let Some(frame) = frame {
                self.frame_done(&frame)?;
            }
        }
    }

    /// Parses the next frame header, when whole: `false` when more bytes
    /// are needed.
    fn header(&mut self) -> Result<bool, String> {
        let rest = self.held.get(self.parsed..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(false);
        }
        let mut cursor = Cursor::new(rest);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) if rest.len() < MAX_HEADER => return Ok(false),
            Ok(None) => return Err("a frame header that never ends".to_owned()),
            Err(error) => return Err(format!("not a WebSocket frame ({error})")),
        };
        refuse_header(Sender::Client, &header, length)?;
        let used = usize::try_from(cursor.position()).unwrap_or(MAX_HEADER);
        self.parsed += used;
        match header.opcode {
            OpCode::Data(Data::Continue) if !self.in_message => {
                return Err("a continuation frame outside a message".to_owned())
            }
            OpCode::Data(Data::Continue) if header.rsv1 => {
                return Err("RSV1 on a continuation frame".to_owned())
            }
            OpCode::Data(Data::Continue) => {}
            OpCode::Data(_) if self.in_message => {
                return Err("a new message before the last one ended".to_owned())
            }
            OpCode::Data(_) => {
                self.in_message = true;
                self.compressed = header.rsv1;
                if header.rsv1 && self.inflater.is_none() {
                    self.unread_message("is compressed by an extension the handshake did not agree (it cannot be read)")?;
                }
            }
            OpCode::Control(_) if header.rsv1 => return Err("RSV1 on a control frame".to_owned()),
            OpCode::Control(_) => {}
        }
        self.frame = Some(Frame {
            opcode: header.opcode,
            fin: header.is_final,
            mask: header.mask,
            read: 0,
            left: length,
        });
        Ok(true)
    }

    /// A frame read whole: a control frame or a message's last frame is
    /// judged.
    fn frame_done(&mut self, frame: &Frame) -> Result<(), String> {
        match frame.opcode {
            OpCode::Control(_) => {
                let control = std::mem::take(&mut self.control);
                self.judge(&control)?;
                if !self.in_message || self.unread {
                    self.ready = self.parsed;
                }
            }
            OpCode::Data(_) if !frame.fin => self.bounded()?,
            OpCode::Data(_) => {
                if !self.unread {
                    let message = std::mem::take(&mut self.message);
                    if self.compressed {
                        self.judge_compressed(message)?;
                    } else {
                        self.judge(&message)?;
                    }
                } else if self.compressed {
                    if let Some(inflater) = self.inflater.as_mut() {
                        let _ = inflate(inflater, &DEFLATE_TAIL, &mut Vec::new(), 0);
                    }
                }
                self.in_message = false;
                self.unread = false;
                self.compressed = false;
                self.message.clear();
                self.ready = self.parsed;
            }
        }
        Ok(())
    }

    fn judge_compressed(&mut self, mut message: Vec<u8>) -> Result<(), String> {
        let limit = self.judge.limit();
        message.extend_from_slice(&DEFLATE_TAIL);
        let mut plain = Vec::new();
        let inflated = match self.inflater.as_mut() {
            Some(inflater) => inflate(inflater, &message, &mut plain, limit),
            None => Err("no inflater".to_owned()),
        };
        match inflated {
            Ok(true) => self.judge(&plain),
            Ok(false) => self.unread_message(&format!("is over {limit} bytes inflated")),
            Err(why) => self.unread_message(&format!("could not be inflated ({why})")),
        }
    }

    fn judge(&self, message: &[u8]) -> Result<(), String> {
        self.judge
            .judge(message)
            .map_err(|refused| format!("refused: {refused}"))
    }

    /// Over the limit: judged as not inspected.
    fn bounded(&mut self) -> Result<(), String> {
        if self.unread || !self.in_message {
            return Ok(());
        }
        let limit = self.judge.limit();
        if self.parsed - self.ready > limit || self.message.len() > limit {
            return self.unread_message(&format!("is over {limit} bytes"));
        }
        Ok(())
    }

    /// The current message cannot be judged (`why`): refused, or (audit)
    /// let on unread from here.
    fn unread_message(&mut self, why: &str) -> Result<(), String> {
        self.judge
            .unread(why)
            .map_err(|refused| format!("refused: {refused}"))?;
        self.unread = true;
        self.message.clear();
        self.ready = self.parsed;
        Ok(())
    }
}

/// Inflates `input` (raw deflate) into `out`: `Ok(false)` when it grows
/// over `limit` (0: no limit, the output dropped as it comes).
fn inflate(
    inflater: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<bool, String> {
    let mut consumed = 0;
    loop {
        if limit > 0 && out.len() > limit {
            return Ok(false);
        }
        if limit == 0 {
            out.clear();
        }
        out.reserve(16 * 1024);
        let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
        let rest = input.get(consumed..).unwrap_or_default();
        let status = inflater
            .decompress_vec(rest, out, FlushDecompress::Sync)
            .map_err(|error| error.to_string())?;
        consumed += usize::try_from(inflater.total_in() - before_in).unwrap_or(usize::MAX);
        let produced = inflater.total_out() - before_out;
        if status == Status::StreamEnd {
            // A final block: the sender starts afresh with the next message.
            inflater.reset(false);
            return Ok(limit == 0 || out.len() <= limit);
        }
        let spare = out.capacity() > out.len();
        if consumed >= input.len() && spare {
            return Ok(limit == 0 || out.len() <= limit);
        }
        if produced == 0 && inflater.total_in() == before_in && spare {
            return Err("the compressed data stops making progress".to_owned());
        }
    }
}

/// The client's side of an upgraded connection, its messages judged
/// before they are read on; writes pass unchanged.
#[derive(Debug)]
pub(crate) struct ScannedFrames<T> {
    inner: T,
    messages: Messages,
}

impl<T> ScannedFrames<T> {
    pub(crate) fn new(inner: T, judge: ScanFrames, deflate: bool) -> ScannedFrames<T> {
        ScannedFrames {
            inner,
            messages: Messages::new(judge, deflate),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScannedFrames<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let judged = this.messages.judged();
            if !judged.is_empty() {
                let n = judged.len().min(buf.remaining());
                buf.put_slice(judged.get(..n).unwrap_or_default());
                this.messages.consume(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = this.messages.failed() {
                tracing::warn!("portcullis closed a WebSocket whose messages it inspects: {error}");
                return Poll::Ready(Err(error));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    if this.messages.holds_unfinished() {
                        tracing::debug!("the client closed a WebSocket mid-message; the unfinished message is not sent");
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => this.messages.feed(read.filled()),
                other => return other,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ScannedFrames<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_middleware::scan::{ScanAction, ScanPolicy, Scanner};
    use portcullis_middleware::{Protocol, RequestInfo, Target, ViolationLogLayer, ViolationRing};

    const TOKEN: &str = "ghp_R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234";

    /// A judge for `action`, recording into the returned ring.
    fn judged_by(action: ScanAction, max_body: usize) -> (ScanFrames, ViolationRing) {
        let ring = ViolationRing::new(16);
        let scan = ScanPolicy {
            scanner: Scanner::builtin(),
            action,
            max_body,
            ..ScanPolicy::default()
        };
        let info = RequestInfo {
            target: Target::parse_authority("ws.test:80", None).unwrap(),
            protocol: Protocol::Http,
            client: None,
            method: http::Method::GET,
        };
        let late = ViolationLogLayer::new(ring.clone()).late();
        (ScanFrames::new(scan, info).recording(late), ring)
    }

    /// A client frame: masked, `first` byte (FIN, RSV1, opcode) as given.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut bytes = vec![first];
        match payload.len() {
            n if n < 126 => bytes.push(0x80 | n as u8),
            n if n < 65536 => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        bytes.extend_from_slice(&mask);
        bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        bytes
    }

    /// Raw deflate of `text` as permessage-deflate sends it (the tail cut),
    /// from one compressor kept across messages.
    fn deflated(compressor: &mut flate2::Compress, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() + 64);
        compressor
            .compress_vec(text, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&DEFLATE_TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// Feeds `stream` in pieces of `chunk`: what is handed on, or the error.
    fn follow(messages: &mut Messages, stream: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        follow_all(messages, stream, chunk).map_err(|(_, error)| error)
    }

    /// The same, with what went on before an error.
    fn follow_all(
        messages: &mut Messages,
        stream: &[u8],
        chunk: usize,
    ) -> Result<Vec<u8>, (Vec<u8>, String)> {
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            messages.feed(piece);
            let judged = messages.judged().to_vec();
            messages.consume(judged.len());
            out.extend(judged);
            if let Some(error) = messages.failed() {
                return Err((out, error.to_string()));
            }
        }
        Ok(out)
    }

    #[test]
    fn ordinary_messages_go_on_byte_for_byte_in_any_split() {
        let mut stream = frame(0x81, b"hello");
        stream.extend(frame(0x01, b"frag"));
        stream.extend(frame(0x89, b"ping in the middle"));
        stream.extend(frame(0x80, b"ment"));
        stream.extend(frame(0x82, &vec![7u8; 70_000]));
        stream.extend(frame(0x88, &[0x03, 0xe8]));
        for chunk in [1, 2, 7, 14, 15, 4096, stream.len()] {
            let (judge, ring) = judged_by(ScanAction::Deny, 0);
            let mut messages = Messages::new(judge, false);
            assert_eq!(
                follow(&mut messages, &stream, chunk).unwrap(),
                stream,
                "{chunk}"
            );
            assert!(!messages.holds_unfinished());
            assert_eq!(ring.total(), 0);
        }
    }

    #[test]
    fn a_secret_split_across_fragments_is_refused_before_any_of_it_goes() {
        let (head, tail) = TOKEN.split_at(20);
        let mut stream = frame(0x81, b"fine");
        let first_len = stream.len();
        stream.extend(frame(0x01, format!("token {head}").as_bytes()));
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x80, tail.as_bytes()));
        for chunk in [1, 5, stream.len()] {
            let (judge, ring) = judged_by(ScanAction::Deny, 0);
            let mut messages = Messages::new(judge, false);
            let (out, refused) = follow_all(&mut messages, &stream, chunk).unwrap_err();
            assert!(refused.contains("github"), "{refused}");
            assert!(refused.contains("a WebSocket message"), "{refused}");
            assert!(!refused.contains(TOKEN) && !refused.contains(tail));
            // Only the message before it went on (the ping waited behind
            // the held message).
            assert_eq!(out.len(), first_len, "{chunk}");
            let records = ring.snapshot();
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].blocked.reason.as_str(), "secret_detected");
        }
    }

    #[test]
    fn control_frames_are_judged_too() {
        let (judge, _) = judged_by(ScanAction::Deny, 0);
        let mut messages = Messages::new(judge, false);
        assert!(follow(&mut messages, &frame(0x89, TOKEN.as_bytes()), 3).is_err());
    }

    #[test]
    fn compressed_messages_are_inflated_with_context_takeover() {
        let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
        // The same text twice: the second message is mostly a back-reference
        // into the first.
        let text = format!("here is my token: {TOKEN}");
        let first = deflated(&mut compressor, text.as_bytes());
        let second = deflated(&mut compressor, text.as_bytes());
        assert!(!second
            .windows(8)
            .any(|w| TOKEN.as_bytes().windows(8).any(|t| t == w)));
        // Both judged when audited, in any split; the second refused under
        // deny although its bytes hold no token.
        let mut stream = frame(0xc1, &first);
        stream.extend(frame(0xc1, &second));
        for chunk in [1, 9, stream.len()] {
            let (judge, ring) = judged_by(ScanAction::Audit, 0);
            let mut messages = Messages::new(judge, true);
            assert_eq!(follow(&mut messages, &stream, chunk).unwrap(), stream);
            assert_eq!(ring.total(), 2, "{chunk}");
        }
        let (judge, ring) = judged_by(ScanAction::Deny, 0);
        let mut messages = Messages::new(judge, true);
        let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
        let mut stream = frame(0xc1, &deflated(&mut compressor, b"nothing to see"));
        stream.extend(frame(0xc1, &deflated(&mut compressor, text.as_bytes())));
        assert!(follow(&mut messages, &stream, 4).is_err());
        assert_eq!(ring.total(), 1);
        // Compressed without the handshake's agreement: not read.
        let (judge, ring) = judged_by(ScanAction::Deny, 0);
        let mut messages = Messages::new(judge, false);
        let error = follow(&mut messages, &frame(0xc1, &first), 4).unwrap_err();
        assert!(error.contains("cannot be read"), "{error}");
        assert_eq!(ring.snapshot()[0].blocked.reason.as_str(), "not_inspected");
    }

    #[test]
    fn a_message_over_the_limit_is_not_inspected_and_a_bomb_is_not_inflated() {
        let (judge_deny, ring) = judged_by(ScanAction::Deny, 1000);
        let mut messages = Messages::new(judge_deny, true);
        let big = frame(0x82, &vec![b'a'; 5000]);
        // Held no further than the limit: refused before the rest is read.
        let mut fed = 0;
        let error = big.chunks(512).find_map(|piece| {
            fed += piece.len();
            messages.feed(piece);
            messages.failed()
        });
        let error = error.expect("refused").to_string();
        assert!(error.contains("over 1000 bytes"), "{error}");
        assert!(fed <= 1000 + 512 + MAX_HEADER, "{fed}");
        assert_eq!(ring.snapshot()[0].blocked.reason.as_str(), "not_inspected");
        // 10 MB of zeros compress to 10 KB: refused once 20 KB are out.
        let mut compressor = flate2::Compress::new(flate2::Compression::best(), false);
        let bomb = deflated(&mut compressor, &vec![0u8; 10_000_000]);
        let (judge_deny, _) = judged_by(ScanAction::Deny, 20_000);
        let mut messages = Messages::new(judge_deny, true);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let stream = frame(0xc2, &bomb);
        let error = follow(&mut messages, &stream, 4096).unwrap_err();
        assert!(error.contains("over 20000 bytes inflated"), "{error}");
        // Under audit the large message goes on unread, whole.
        let (judge_audit, ring) = judged_by(ScanAction::Audit, 1000);
        let mut messages = Messages::new(judge_audit, false);
        let mut stream = big.clone();
        stream.extend(frame(0x81, b"after"));
        assert_eq!(follow(&mut messages, &stream, 700).unwrap(), stream);
        assert_eq!(ring.total(), 1);
    }

    #[test]
    fn what_is_not_a_message_is_refused() {
        for stream in [
            frame(0x80, b"continuation with no start"),
            [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
            frame(0x83, b"reserved opcode"),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            frame(0xc9, b"rsv1 ping"),
        ] {
            let (judge, _) = judged_by(ScanAction::Deny, 0);
            let mut messages = Messages::new(judge, true);
            assert!(follow(&mut messages, &stream, 3).is_err(), "{stream:?}");
        }
    }
}
