//! Progress: an indicatif bar on a terminal, plain periodic lines on stderr otherwise. Both show
//! done/total, failed, rate and ETA; the rate is measured over the last 10 s so the ETA follows
//! the pool's steady pace rather than the start-up burst.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::VecDeque;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Mode {
    Bar(ProgressBar),
    Plain { every: Duration, last: Instant },
}

/// The progress display of one run.
#[derive(Debug)]
pub(crate) struct Progress {
    total: u64,
    done: u64,
    failed: u64,
    start: Instant,
    samples: VecDeque<(Instant, u64)>,
    mode: Mode,
}

impl Progress {
    /// A bar when stderr is a terminal, else a plain line every `every`.
    pub(crate) fn new(total: u64, every: Duration) -> Self {
        let now = Instant::now();
        let mode = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Mode::Bar(bar)
        } else {
            Mode::Plain { every, last: now }
        };
        Self {
            total,
            done: 0,
            failed: 0,
            start: now,
            samples: VecDeque::from([(now, 0)]),
            mode,
        }
    }

    /// One item finished.
    pub(crate) fn finished(&mut self, ok: bool) {
        self.done += 1;
        if !ok {
            self.failed += 1;
        }
        if let Mode::Bar(b) = &self.mode {
            b.set_position(self.done);
        }
    }

    /// Items per second over the last 10 s (since the start when shorter).
    pub(crate) fn rate(&self, now: Instant) -> f64 {
        let (t0, d0) = self.samples.front().copied().unwrap_or((self.start, 0));
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.5 {
            return 0.0;
        }
        (self.done - d0) as f64 / dt
    }

    /// Time left at the current rate.
    pub(crate) fn eta(&self, now: Instant) -> Option<Duration> {
        let rate = self.rate(now);
        (rate > 0.0).then(|| Duration::from_secs_f64((self.total - self.done) as f64 / rate))
    }

    /// The status text: `200/400 done, 1 failed, 57.1/s, ETA 3.5s, elapsed 3.5s`.
    pub(crate) fn line(&self, now: Instant) -> String {
        let eta = self
            .eta(now)
            .map_or_else(|| "?".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        format!(
            "{}/{} done, {} failed, {:.1}/s, ETA {eta}, elapsed {:.1}s",
            self.done,
            self.total,
            self.failed,
            self.rate(now),
            now.duration_since(self.start).as_secs_f64()
        )
    }

    /// Called a few times a second: samples the rate, redraws the bar or prints a plain line.
    pub(crate) fn tick(&mut self) {
        let now = Instant::now();
        self.samples.push_back((now, self.done));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            self.samples.pop_front();
        }
        let text = self.line(now);
        let failed = self.failed;
        let rate = self.rate(now);
        let eta = self
            .eta(now)
            .map_or_else(|| "?".to_owned(), |d| format!("{}s", d.as_secs()));
        match &mut self.mode {
            Mode::Bar(b) => {
                b.set_message(format!("failed {failed}  {rate:.1}/s  ETA {eta}"));
            }
            Mode::Plain { every, last } => {
                if now.duration_since(*last) >= *every {
                    *last = now;
                    eprintln!("[batch] {text}");
                }
            }
        }
    }

    /// Clears the bar (the summary is printed after it).
    pub(crate) fn finish(&self) {
        if let Mode::Bar(b) = &self.mode {
            b.finish_and_clear();
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
