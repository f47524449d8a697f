//! Time spent per phase of an operation, for the log.

/// Time spent per phase of an operation (`reconcile`, the daemon's start, and `run`/`rm` at
/// debug level).
pub struct Laps(Vec<(&'static str, u128)>, std::time::Instant);

impl Default for Laps {
    fn default() -> Self {
        Self::new()
    }
}

impl Laps {
    pub fn new() -> Self {
        Laps(vec![], std::time::Instant::now())
    }
    pub fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.0.push((name, (now - self.1).as_micros()));
        self.1 = now;
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(n, us)| format!("{n} {:.1}", *us as f64 / 1000.0)).collect();
        f.write_str(&parts.join(", "))
    }
}
