//! What Linux's `/proc` says about a process: the CPU time it has used and its resident memory. The load generator
//! reads the CPU time of the processes it is told about (a gateway, a PIN server) and its own on both sides of a run,
//! and reports what each spent per answered request; the benches read their own threads' and processes' the same way.

use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// CPU time used so far (user + system) by a process or a thread, as `/proc/…/stat` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuReading {
    /// utime + stime, in clock ticks ([`ticks_per_second`]).
    pub ticks: u64,
    /// When the process started (ticks after boot): a process that ended and another given the same id differ here.
    pub started: u64,
}

impl CpuReading {
    /// Of process `pid`.
    pub fn of_process(pid: u32) -> Result<CpuReading, String> {
        CpuReading::read(Path::new(&format!("/proc/{pid}/stat")))
    }

    /// Of this process (all its threads).
    pub fn of_this_process() -> Result<CpuReading, String> {
        CpuReading::read(Path::new("/proc/self/stat"))
    }

    /// Of the calling thread alone.
    pub fn of_this_thread() -> Result<CpuReading, String> {
        CpuReading::read(Path::new("/proc/thread-self/stat"))
    }

    fn read(path: &Path) -> Result<CpuReading, String> {
        let stat = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        CpuReading::parse(&stat).ok_or_else(|| format!("{}: not a stat line", path.display()))
    }

    /// A `stat` line: `pid (comm) state ppid …`; utime and stime are its fields 14 and 15, starttime field 22.
    pub fn parse(stat: &str) -> Option<CpuReading> {
        // The command name is in parentheses and may hold spaces and parentheses of its own: the fields start after
        // the last `)`, with the state (field 3) first.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(CpuReading {
            ticks: field(14)? + field(15)?,
            started: field(22)?,
        })
    }

    /// The CPU time spent from `self` to the later reading `end` of the same process.
    pub fn until(&self, end: &CpuReading) -> Result<Duration, String> {
        if end.started != self.started || end.ticks < self.ticks {
            return Err("the process ended, and another took its id".into());
        }
        Ok(ticks_to_duration(end.ticks - self.ticks))
    }
}

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`, asked once).
pub fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            // Without getconf: Linux reports these times in USER_HZ, 100 on every architecture it runs on but alpha
            // and ia64.
            .unwrap_or(100)
    })
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = ticks_per_second();
    Duration::from_secs(ticks / per_second) + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// Resident memory of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{path}: no VmRSS"))
}

/// A process whose CPU time a run reports, named for the report: `NAME=PID` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Watched, String> {
        let (name, pid) = s.split_once('=').ok_or_else(|| format!("`{s}`: NAME=PID"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("`{s}`: the process id `{pid}` is not a number"))?;
        if name.is_empty() {
            return Err(format!("`{s}`: NAME=PID, with a name"));
        }
        Ok(Watched { name: name.into(), pid })
    }
}

/// CPU readings of the watched processes and of this one, taken when a run starts; [`CpuWatch::finish`] takes the
/// second ones.
#[derive(Debug)]
pub struct CpuWatch {
    started: Instant,
    watched: Vec<(Watched, CpuReading)>,
    this_process: CpuReading,
}

/// The CPU time a process spent over a run.
#[derive(Clone, Debug)]
pub struct ProcessCpu {
    pub name: String,
    pub pid: u32,
    pub cpu: Duration,
}

/// What the watched processes, and this one, spent over a run of `wall` time.
#[derive(Clone, Debug)]
pub struct CpuUse {
    pub wall: Duration,
    pub watched: Vec<ProcessCpu>,
    pub this_process: ProcessCpu,
}

impl CpuWatch {
    /// First readings; fails naming the process that cannot be read (not running, or not ours to read).
    pub fn start(watched: &[Watched]) -> Result<CpuWatch, String> {
        let mut first = Vec::with_capacity(watched.len());
        for w in watched {
            let reading = CpuReading::of_process(w.pid).map_err(|e| format!("{}={}: {e}", w.name, w.pid))?;
            first.push((w.clone(), reading));
        }
        Ok(CpuWatch {
            started: Instant::now(),
            watched: first,
            this_process: CpuReading::of_this_process()?,
        })
    }

    /// Second readings: the CPU each process spent since [`CpuWatch::start`].
    pub fn finish(self) -> Result<CpuUse, String> {
        let wall = self.started.elapsed();
        let mut watched = Vec::with_capacity(self.watched.len());
        for (w, first) in self.watched {
            let cpu = CpuReading::of_process(w.pid)
                .and_then(|end| first.until(&end))
                .map_err(|e| format!("{}={}: {e}", w.name, w.pid))?;
            watched.push(ProcessCpu {
                name: w.name,
                pid: w.pid,
                cpu,
            });
        }
        let this_process = ProcessCpu {
            name: "pingate-load".into(),
            pid: std::process::id(),
            cpu: self.this_process.until(&CpuReading::of_this_process()?)?,
        };
        Ok(CpuUse {
            wall,
            watched,
            this_process,
        })
    }
}

impl ProcessCpu {
    /// Microseconds of CPU per request answered in the run; `None` when none was.
    pub fn us_per_request(&self, answered: u64) -> Option<f64> {
        (answered > 0).then(|| self.cpu.as_secs_f64() * 1e6 / answered as f64)
    }

    /// The CPU time as a share of one core over `wall` (200 for two cores kept busy).
    pub fn percent_of_one_core(&self, wall: Duration) -> f64 {
        100.0 * self.cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_whose_command_name_holds_spaces_and_parentheses() {
        // Fields 14 (utime), 15 (stime) and 22 (starttime) of a real line, the name changed.
        let line = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 2040 0 0 0 731 129 0 0 20 0 9 0 81234 \
                    1024000 3000 18446744073709551615 1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            CpuReading::parse(line),
            Some(CpuReading {
                ticks: 731 + 129,
                started: 81234
            })
        );
        assert_eq!(CpuReading::parse("4242 (cut short) S 1 2"), None);
        assert_eq!(CpuReading::parse("no parenthesis"), None);
    }

    #[test]
    fn cpu_between_two_readings_of_one_process_and_not_of_another_with_its_id() {
        let a = CpuReading { ticks: 100, started: 7 };
        let b = CpuReading {
            ticks: 100 + 3 * ticks_per_second(),
            started: 7,
        };
        assert_eq!(a.until(&b), Ok(Duration::from_secs(3)));
        assert!(a.until(&CpuReading { ticks: 500, started: 8 }).is_err());
    }

    #[test]
    fn this_process_and_thread_are_readable_and_the_thread_counts_its_own_work() {
        let before = CpuReading::of_this_thread().unwrap();
        let mut x = 0u64;
        let t = Instant::now();
        // Enough work for several clock ticks.
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = CpuReading::of_this_thread().unwrap();
        assert!(before.until(&after).unwrap() > Duration::ZERO);
        assert!(CpuReading::of_this_process().unwrap().ticks >= after.ticks);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn watched_processes_on_the_command_line() {
        assert_eq!(
            "gateway=1234".parse(),
            Ok(Watched {
                name: "gateway".into(),
                pid: 1234
            })
        );
        for bad in ["gateway", "=1234", "gateway=", "gateway=12x"] {
            assert!(bad.parse::<Watched>().is_err(), "{bad}");
        }
    }

    #[test]
    fn per_request_and_share_of_a_core() {
        let p = ProcessCpu {
            name: "gateway".into(),
            pid: 1,
            cpu: Duration::from_millis(500),
        };
        assert_eq!(p.us_per_request(1000), Some(500.0));
        assert_eq!(p.us_per_request(0), None);
        assert!((p.percent_of_one_core(Duration::from_secs(2)) - 25.0).abs() < 1e-9);
    }
}
