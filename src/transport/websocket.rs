//! After a `101` to a host with request rules: every byte must belong to a
//! WebSocket frame ([`WebSocketFramesOnly`](portcullis_middleware::WebSocketFramesOnly)).
//!
//! [`FramesOnly`] wraps one side of the relay and follows the frames as
//! their bytes are read (headers parsed by tungstenite, payloads counted,
//! nothing buffered past a 14-byte header): the first byte that cannot be a
//! frame — a reserved opcode, RSV2/RSV3, a client frame without its mask or
//! an origin frame with one, a fragmented or oversized control frame —
//! ends the read with an error, which closes both sides. The payloads
//! themselves are left to the content inspection that builds on this.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub(crate) const MAX_HEADER: usize = 14;

/// Who sends the frames a [`FrameCheck`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    /// The client: its frames must be masked (RFC 6455 5.3).
    Client,
    /// The origin: its frames must not be.
    Origin,
}

/// Follows a byte stream frame by frame; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct FrameCheck {
    sender: Sender,
    header: Vec<u8>,
    payload_left: u64,
}

impl FrameCheck {
    pub(crate) fn new(sender: Sender) -> FrameCheck {
        FrameCheck {
            sender,
            header: Vec::with_capacity(MAX_HEADER),
            payload_left: 0,
        }
    }

    /// Takes the next bytes of the stream; `Err` says why they are not
    /// WebSocket frames.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= skip as u64;
                bytes = bytes.get(skip..).unwrap_or_default();
                continue;
            }
            let take = (MAX_HEADER - self.header.len()).min(bytes.len());
            self.header
                .extend_from_slice(bytes.get(..take).unwrap_or_default());
            bytes = bytes.get(take..).unwrap_or_default();
            let mut cursor = Cursor::new(&self.header[..]);
            match FrameHeader::parse(&mut cursor) {
                Ok(None) if self.header.len() < MAX_HEADER => {}
                Ok(None) => return Err("a frame header that never ends".to_owned()),
                Ok(Some((header, length))) => {
                    self.check(&header, length)?;
                    let used = usize::try_from(cursor.position()).unwrap_or(MAX_HEADER);
                    // Bytes taken past the header belong to the payload (and
                    // perhaps to the next frame): feed them again. They are
                    // fewer each time, so this ends.
                    let taken_past = self.header.split_off(used.min(self.header.len()));
                    self.header.clear();
                    self.payload_left = length;
                    self.feed(&taken_past)?;
                }
                Err(error) => return Err(format!("not a WebSocket frame ({error})")),
            }
        }
        Ok(())
    }

    fn check(&self, header: &FrameHeader, length: u64) -> Result<(), String> {
        refuse_header(self.sender, header, length)
    }
}

/// Why a frame's header cannot be a WebSocket frame from `sender`.
pub(crate) fn refuse_header(
    sender: Sender,
    header: &FrameHeader,
    length: u64,
) -> Result<(), String> {
    if header.rsv2 || header.rsv3 {
        return Err("a frame with RSV2 or RSV3 set (no extension uses them)".to_owned());
    }
    match (sender, header.mask.is_some()) {
        (Sender::Client, false) => return Err("a client frame without a mask".to_owned()),
        (Sender::Origin, true) => return Err("an origin frame with a mask".to_owned()),
        _ => {}
    }
    match header.opcode {
        OpCode::Data(Data::Reserved(code)) | OpCode::Control(Control::Reserved(code)) => {
            Err(format!("a frame with the reserved opcode {code:#x}"))
        }
        OpCode::Control(_) if !header.is_final || length > 125 => {
            Err("a control frame fragmented or over 125 bytes".to_owned())
        }
        _ => Ok(()),
    }
}

/// One side of an upgraded connection, its reads followed by a
/// [`FrameCheck`]; writes pass unchanged.
#[derive(Debug)]
pub(crate) struct FramesOnly<T> {
    inner: T,
    check: FrameCheck,
}

impl<T> FramesOnly<T> {
    pub(crate) fn new(inner: T, sender: Sender) -> FramesOnly<T> {
        FramesOnly {
            inner,
            check: FrameCheck::new(sender),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramesOnly<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = buf.filled().get(before..).unwrap_or_default();
                match this.check.feed(fresh) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(why) => {
                        // Nothing of this read is passed on.
                        buf.set_filled(before);
                        tracing::warn!(
                            sender = ?this.check.sender,
                            "portcullis closed an upgraded connection to a host with request rules: {why}; only WebSocket frames may follow its 101"
                        );
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)))
                    }
                }
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramesOnly<T> {
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

    /// A frame as a client (masked) or an origin (unmasked) sends it.
    fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut bytes = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => bytes.push(mask_bit | n as u8),
            n if n < 65536 => {
                bytes.push(mask_bit | 126);
                bytes.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                bytes.push(mask_bit | 127);
                bytes.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            bytes.extend_from_slice(&[1, 2, 3, 4]);
        }
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn frames_pass_in_any_split() {
        let mut stream = frame(1, b"hello", true);
        stream.extend(frame(2, &vec![7u8; 70_000], true));
        stream.extend(frame(9, b"ping", true));
        stream.extend(frame(1, b"", true));
        for chunk in [1, 2, 3, 13, 14, 15, 4096, stream.len()] {
            let mut check = FrameCheck::new(Sender::Client);
            for piece in stream.chunks(chunk) {
                check.feed(piece).unwrap();
            }
            assert_eq!(check.payload_left, 0, "chunk {chunk}");
            assert!(check.header.is_empty(), "chunk {chunk}");
        }
    }

    #[test]
    fn what_is_not_a_frame_is_refused() {
        let refused = |bytes: &[u8], sender| FrameCheck::new(sender).feed(bytes).is_err();
        // A plain HTTP request after the 101.
        assert!(refused(
            b"DELETE /public/secret/x HTTP/1.1\r\n",
            Sender::Client
        ));
        assert!(refused(&frame(1, b"x", false), Sender::Client));
        assert!(refused(&frame(1, b"x", true), Sender::Origin));
        assert!(refused(&frame(3, b"x", true), Sender::Client));
        assert!(refused(&frame(0xb, b"x", true), Sender::Client));
        assert!(refused(&frame(9, &[0; 126], true), Sender::Client));
        let mut rsv2 = frame(1, b"x", true);
        rsv2[0] |= 0x20;
        assert!(refused(&rsv2, Sender::Client));
        // Good frames, then garbage: refused when the garbage arrives.
        let mut check = FrameCheck::new(Sender::Origin);
        check.feed(&frame(1, b"ok", false)).unwrap();
        assert!(check.feed(b"GET / HTTP/1.1\r\n").is_err());
        // RSV1 (permessage-deflate) passes.
        let mut deflated = frame(1, b"x", true);
        deflated[0] |= 0x40;
        assert!(!refused(&deflated, Sender::Client));
    }
}

/// What an upgraded connection's relay reads, from the marks on the
/// `101`: anything, WebSocket frames only, or frames whose client
/// messages are judged.
#[derive(Debug, Clone)]
pub(crate) enum Relay {
    Anything,
    FramesOnly,
    /// `deflate`: the response agreed permessage-deflate.
    Scanned(Box<portcullis_middleware::ScanFrames>, bool),
}

impl Relay {
    pub(crate) fn of<B>(response: &http::Response<B>) -> Relay {
        let extensions = response.extensions();
        if let Some(judge) = extensions.get::<portcullis_middleware::ScanFrames>() {
            let deflate = response
                .headers()
                .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .any(|offer| {
                    offer
                        .split(';')
                        .next()
                        .is_some_and(|name| name.trim().eq_ignore_ascii_case("permessage-deflate"))
                });
            return Relay::Scanned(Box::new(judge.clone()), deflate);
        }
        if extensions
            .get::<portcullis_middleware::WebSocketFramesOnly>()
            .is_some()
        {
            return Relay::FramesOnly;
        }
        Relay::Anything
    }
}
