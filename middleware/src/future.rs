//! The response future shared by layers that either refuse at once or
//! hand the request to their inner service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// Either the inner service's future, or a refusal decided in `call`:
    /// the response future of a layer that refuses or passes on, as the
    /// built-in ones are (tower's `Either` is not a `Future`). Its output's
    /// error is a [`BoxError`], so a refusal is any error — a
    /// [`Blocked`](crate::Blocked) for one the proxy renders and records.
    ///
    /// ```
    /// use std::task::{Context, Poll};
    /// use http::Request;
    /// use portcullis_middleware::{Blocked, BoxError, Reason, RequestInfo, ResponseFuture, Source};
    /// use tower::Service;
    ///
    /// /// Refuses requests without an `x-team` header.
    /// #[derive(Clone)]
    /// struct RequireTeam<S>(S);
    ///
    /// impl<S, B> Service<Request<B>> for RequireTeam<S>
    /// where
    ///     S: Service<Request<B>>,
    ///     S::Error: Into<BoxError>,
    /// {
    ///     type Response = S::Response;
    ///     type Error = BoxError;
    ///     type Future = ResponseFuture<S::Future>;
    ///
    ///     fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
    ///         self.0.poll_ready(cx).map_err(Into::into)
    ///     }
    ///
    ///     fn call(&mut self, request: Request<B>) -> Self::Future {
    ///         if request.headers().contains_key("x-team") {
    ///             return ResponseFuture::inner(self.0.call(request));
    ///         }
    ///         match RequestInfo::from_request(&request) {
    ///             Ok(info) => ResponseFuture::refused(
    ///                 Blocked::new(Reason::Custom("no_team"), Source::Layer("require_team"), info.target, info.protocol, &info.method)
    ///                     .with_message("this proxy needs an x-team header"),
    ///             ),
    ///             Err(error) => ResponseFuture::refused(error),
    ///         }
    ///     }
    /// }
    /// ```
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Inner { #[pin] future: F },
        Refused { error: Option<BoxError> },
    }
}

impl<F> ResponseFuture<F> {
    /// Passes on: the inner service's `future`, its error boxed.
    pub fn inner(future: F) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Inner { future },
        }
    }

    /// Refuses: resolves at once to `error` (a [`Blocked`](crate::Blocked)
    /// for a refusal the proxy renders, records and words).
    pub fn refused(error: impl Into<BoxError>) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Refused {
                error: Some(error.into()),
            },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future } => future.poll(cx).map_err(Into::into),
            StateProj::Refused { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Ready(Err(
                    "portcullis: response future polled after completion".into()
                )),
            },
        }
    }
}

pin_project! {
    /// The response future of a layer that lets a request on with marks for
    /// its response: the [`Intercept`](crate::Intercept) answer (limited
    /// mode, request rules) and an [`Audited`](crate::Audited) would-be
    /// refusal (request rules in audit mode).
    #[derive(Debug)]
    pub struct MarkedResponse<F> {
        #[pin]
        inner: ResponseFuture<F>,
        intercept: bool,
        frames_only: bool,
        // Rare, and large: boxed, so the future every request moves
        // through the stack stays small.
        marks: Option<Box<Marks>>,
    }
}

/// The rarer marks of a [`MarkedResponse`].
#[derive(Debug, Default)]
struct Marks {
    audited: Option<crate::error::Blocked>,
    injected: Option<crate::request::Injected>,
    extensions: Option<http::Extensions>,
}

impl<F> MarkedResponse<F> {
    /// The inner service's future, unmarked.
    pub(crate) fn inner(future: F) -> MarkedResponse<F> {
        MarkedResponse::marked(future, false, None)
    }

    /// The inner service's future, its response marked.
    pub(crate) fn marked(
        future: F,
        intercept: bool,
        audited: Option<crate::error::Blocked>,
    ) -> MarkedResponse<F> {
        MarkedResponse {
            inner: ResponseFuture::inner(future),
            intercept,
            frames_only: false,
            marks: audited.map(|audited| {
                Box::new(Marks {
                    audited: Some(audited),
                    ..Marks::default()
                })
            }),
        }
    }

    /// Also says, on the response, that an upgrade must carry WebSocket
    /// frames only ([`WebSocketFramesOnly`](crate::WebSocketFramesOnly)).
    pub(crate) fn frames_only(mut self, frames_only: bool) -> MarkedResponse<F> {
        self.frames_only = frames_only;
        self
    }

    /// Also puts `value` in the response's extensions (a mark for the
    /// transport, such as [`ScanFrames`](crate::ScanFrames)).
    pub(crate) fn with_extension<T: Clone + Send + Sync + 'static>(
        mut self,
        value: T,
    ) -> MarkedResponse<F> {
        self.marks
            .get_or_insert_with(Box::default)
            .extensions
            .get_or_insert_with(http::Extensions::new)
            .insert(value);
        self
    }

    /// Also says, on the response, which credentials were added.
    pub(crate) fn injected(mut self, injected: crate::request::Injected) -> MarkedResponse<F> {
        self.marks.get_or_insert_with(Box::default).injected = Some(injected);
        self
    }

    /// A refusal decided in `call`.
    pub(crate) fn refused(error: impl Into<BoxError>) -> MarkedResponse<F> {
        MarkedResponse {
            inner: ResponseFuture::refused(error),
            intercept: false,
            frames_only: false,
            marks: None,
        }
    }
}

impl<F, R, E> Future for MarkedResponse<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let intercept = *this.intercept;
        let frames_only = *this.frames_only;
        let marks = this.marks;
        this.inner.poll(cx).map_ok(|mut response| {
            if let Some(marks) = marks.take() {
                let Marks {
                    audited,
                    injected,
                    extensions,
                } = *marks;
                if let Some(extensions) = extensions {
                    response.extensions_mut().extend(extensions);
                }
                if let Some(injected) = injected {
                    response.extensions_mut().insert(injected);
                }
                if let Some(blocked) = audited {
                    response.extensions_mut().insert(crate::Audited(blocked));
                }
            }
            if intercept {
                response.extensions_mut().insert(crate::Intercept);
            }
            if frames_only {
                response.extensions_mut().insert(crate::WebSocketFramesOnly);
            }
            response
        })
    }
}
