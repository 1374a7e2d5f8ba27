//! The shutdown signal every task selects on (mini-redis' `shutdown.rs`).

use tokio::sync::watch;

/// Listens for the server's shutdown signal. Cheap to clone; every task owns one.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    pub(crate) fn new(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown { rx }
    }

    /// Resolves once shutdown was signalled (or the signalling side is gone).
    /// Cancel-safe: use it in `select!`.
    pub(crate) async fn recv(&mut self) {
        loop {
            let signalled = *self.rx.borrow_and_update();
            if signalled || self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}
