//! What librdkafka reports through a client's callbacks, logged so that an
//! outage reads as one line per cause, not hundreds: every client (the
//! consumer, each producer, the admin client) reports the same broker
//! outage, through both its error and its log callback, at each reconnect
//! attempt (about ten a second per client with the default back-off).
//!
//! A cause (an error code, or a log facility at a level) is logged once
//! per [`EVERY`]; the next line after that says how many were left out
//! (`left_out`) since when (`since`). Lines have the target `librdkafka`.
//! Connection trouble librdkafka retries by itself (a broker down, a
//! transport failure, a name that does not resolve) is a warning: a member
//! that cannot reach the brokers at start, or loses its group, stops with an
//! error of its own.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::{debug, error, info, warn};

use crate::event::{Millis, format_rfc3339, wall_clock_ms};

/// How often one cause is logged at most.
pub const EVERY: Duration = Duration::from_secs(30);

/// When each cause was last logged (monotonic, and on the wall clock), and
/// how many reports were left out since.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    last: HashMap<String, (Instant, Millis, u64)>,
}

impl Limiter {
    /// Whether a report of `cause` at `now` (`wall` on the wall clock) is
    /// logged: `Some((n, since))`, with the `n` reports of it left out
    /// since it was last logged at `since`; `None` if it is left out.
    pub(crate) fn admit(
        &mut self,
        cause: &str,
        now: Instant,
        wall: Millis,
    ) -> Option<(u64, Millis)> {
        match self.last.get_mut(cause) {
            Some((at, _, left_out)) if now.duration_since(*at) < EVERY => {
                *left_out += 1;
                None
            }
            Some((at, logged, left_out)) => {
                let since = std::mem::replace(logged, wall);
                *at = now;
                Some((std::mem::take(left_out), since))
            }
            None => {
                self.last.insert(cause.to_owned(), (now, wall, 0));
                Some((0, wall))
            }
        }
    }
}

/// One limiter for every client of the process: they report the same outage.
static LIMITER: LazyLock<Mutex<Limiter>> = LazyLock::new(Mutex::default);

/// What a logged report says of those left out before it: how many, and
/// since when (the previous line of the cause; the count may cover a spell
/// long past). Empty `since` for a cause's first line.
struct LeftOut {
    count: u64,
    since: String,
}

/// Logs at `$level` with target `librdkafka`, adding `left_out` and
/// `since` when reports were left out before this one.
macro_rules! report {
    ($level:ident, $left:expr, $($rest:tt)*) => {
        match $left {
            LeftOut { count: 0, .. } => $level!(target: "librdkafka", $($rest)*),
            LeftOut { count, since } => {
                $level!(target: "librdkafka", left_out = count, since, $($rest)*)
            }
        }
    };
}

fn admit(cause: &str) -> Option<LeftOut> {
    LIMITER
        .lock()
        .admit(cause, Instant::now(), wall_clock_ms())
        .map(|(count, since)| LeftOut {
            count,
            since: if count == 0 {
                String::new()
            } else {
                format_rfc3339(since)
            },
        })
}

/// Errors librdkafka retries by itself: connection trouble.
fn transient(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// A client's error callback.
pub fn client_error(e: &KafkaError, reason: &str) {
    let code = e.rdkafka_error_code();
    let cause = format!("error {code:?}");
    let Some(left) = admit(&cause) else {
        return;
    };
    if transient(code) {
        report!(warn, left, error = %e, reason, "librdkafka reported an error.");
    } else {
        report!(error, left, error = %e, reason, "librdkafka reported an error.");
    }
}

/// A client's log callback. A failed connection (facility `FAIL`, logged
/// at error level by librdkafka) is a warning, like the error callback's
/// report of the same failure.
pub fn client_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
            let Some(left) = admit(&format!("log {fac} {level:?}")) else {
                return;
            };
            if fac == "FAIL" || matches!(level, L::Warning) {
                report!(warn, left, facility = fac, "{message}");
            } else {
                report!(error, left, facility = fac, "{message}");
            }
        }
        L::Notice | L::Info => info!(target: "librdkafka", facility = fac, "{message}"),
        L::Debug => debug!(target: "librdkafka", facility = fac, "{message}"),
    }
}

/// A client context that only logs, through [`client_error`] and
/// [`client_log`] (the admin client's).
pub struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        client_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_logged_once_per_interval_with_what_was_left_out() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let w0: Millis = 1_800_000_000_000;
        let at = |d: Duration| (t0 + d, w0 + d.as_millis() as Millis);
        let admit = |l: &mut Limiter, cause: &str, d: Duration| {
            let (now, wall) = at(d);
            l.admit(cause, now, wall)
        };
        assert_eq!(
            admit(&mut l, "AllBrokersDown", Duration::ZERO),
            Some((0, w0))
        );
        for i in 1..=170 {
            assert_eq!(
                admit(&mut l, "AllBrokersDown", Duration::from_millis(i * 50)),
                None
            );
        }
        // Another cause is not held back by the first.
        let second = Duration::from_secs(1);
        assert_eq!(admit(&mut l, "Resolve", second), Some((0, w0 + 1000)));
        // The count left out comes with when the spell began, however late.
        let hour = Duration::from_secs(3600);
        assert_eq!(admit(&mut l, "AllBrokersDown", hour), Some((170, w0)));
        assert_eq!(
            admit(&mut l, "AllBrokersDown", hour + EVERY * 3),
            Some((0, w0 + 3_600_000))
        );
    }

    #[test]
    fn connection_trouble_is_transient_and_other_errors_are_not() {
        assert!(transient(Some(RDKafkaErrorCode::AllBrokersDown)));
        assert!(transient(Some(RDKafkaErrorCode::BrokerTransportFailure)));
        assert!(!transient(Some(RDKafkaErrorCode::Authentication)));
        assert!(!transient(None));
    }
}
