//! Unix signals, PgBouncer's way: SIGHUP reloads the configuration, SIGUSR1 pauses every
//! database, SIGUSR2 resumes them, SIGTERM drains and stops, SIGINT stops at once.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::shared::{Shared, StopMode};

/// Acts on signals until the task is dropped.
pub async fn handle(shared: Arc<Shared>) {
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::warn!("cannot listen for signals");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => match shared.reload() {
                Ok(_) => {}
                Err(e) => tracing::error!("reload failed, the running configuration stays: {e}"),
            },
            _ = term.recv() => {
                tracing::info!("SIGTERM: no new clients; waiting for transactions in flight");
                shared.request_stop(StopMode::WaitForServers);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: closing every client now");
                shared.request_stop(StopMode::Fast);
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: pausing every database");
                let shared = shared.clone();
                tokio::spawn(async move { crate::admin::actions::pause(&shared, None).await });
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: resuming every database");
                let _ = crate::admin::actions::resume(&shared, None);
            }
        }
    }
}
