//! The response future shared by layers that either refuse at once or
//! hand the request to their inner service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// Either the inner service's future, or a refusal decided in `call`.
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
    pub(crate) fn inner(future: F) -> ResponseFuture<F> {
        ResponseFuture {
            state: State::Inner { future },
        }
    }

    pub(crate) fn refused(error: impl Into<BoxError>) -> ResponseFuture<F> {
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
