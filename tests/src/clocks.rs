//! Wall clocks that are off, for the clock nemesis: a process started with [`FakeClock::env`]
//! runs under libfaketime (Debian's `faketime`, from `scripts/install-fault-tools`), its wall
//! clock (`CLOCK_REALTIME`: what `SystemTime` and `OffsetDateTime::now_utc` read) shifted by the
//! offset in a file that [`FakeClock::set`] rewrites during the run: libfaketime reads it again
//! within two seconds ([`FakeClock::LAG`]), so a jump forward or back reaches a running process.
//! The monotonic clock is left alone (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as a real wall-clock
//! step leaves it: tokio's timers keep working. nats-server (Go, static) is
//! never faked: its clock is the cluster's, the one the checker judges by.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

/// libfaketime's multi-threaded library: `FAKETIME_LIB` (which `scripts/install-fault-tools`
/// prints and `scripts/test` sets).
pub fn faketime_lib() -> PathBuf {
    std::env::var("FAKETIME_LIB")
        .expect("FAKETIME_LIB: run the tests with scripts/test, or set it to the output of scripts/install-fault-tools")
        .into()
}

/// One process's (or a group's) wall clock offset, in a file libfaketime reads.
pub struct FakeClock {
    dir: TempDir,
    offset: std::sync::Mutex<i64>,
}

impl FakeClock {
    /// A clock `offset_s` seconds off (positive: ahead).
    pub fn new(offset_s: i64) -> Self {
        let clock = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            offset: std::sync::Mutex::new(0),
        };
        clock.set(offset_s);
        clock
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("faketime.rc")
    }

    /// The environment that puts a process on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", faketime_lib().display().to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.file().display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }

    /// Moves the clock to `offset_s` seconds off: a jump for the processes on it, within about
    /// two seconds ([`FakeClock::LAG`]).
    pub fn set(&self, offset_s: i64) {
        // Written whole, then renamed: a reader never sees half a line.
        let tmp = self.dir.path().join("faketime.rc.new");
        std::fs::write(&tmp, format!("{offset_s:+}s\n")).expect("write the faketime file");
        std::fs::rename(&tmp, self.file()).expect("replace the faketime file");
        *self.offset.lock().unwrap() = offset_s;
    }

    /// The offset now, in seconds.
    pub fn offset(&self) -> i64 {
        *self.offset.lock().unwrap()
    }

    /// How long a running process may still read the previous offset after [`FakeClock::set`].
    /// With `FAKETIME_CACHE_DURATION=1`, libfaketime 0.9.10 re-reads the file every two seconds
    /// (measured: a process reading its clock every 20 ms saw changes at 2 s intervals), so a
    /// process may keep its old offset for up to two seconds after a change.
    pub const LAG: Duration = Duration::from_secs(2);
}
