//! The kernel's own numbers about this process's memory: what every memory
//! claim of guestmm is checked against (never the library's counters).

use std::io;

/// A snapshot of `/proc/self/smaps_rollup`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// `Rss:` resident set (a shared page counts once per mapping).
    pub rss: u64,
    /// `Pss:` proportional set size (shared pages split between mappers).
    pub pss: u64,
    /// `Anonymous:` private anonymous pages.
    pub anonymous: u64,
    /// `Pss_Shmem:` shmem/memfd share.
    pub pss_shmem: u64,
}

impl ProcessMemory {
    /// Reads `/proc/self/smaps_rollup`.
    pub fn current() -> io::Result<ProcessMemory> {
        Self::parse(&std::fs::read_to_string("/proc/self/smaps_rollup")?)
    }

    /// Parses the text of an `smaps_rollup` file.
    pub fn parse(text: &str) -> io::Result<ProcessMemory> {
        let mut m = ProcessMemory::default();
        let mut seen_rss = false;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(val)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(kb) = val.parse::<u64>() else { continue };
            let bytes = kb * 1024;
            match key {
                "Rss:" => {
                    m.rss = bytes;
                    seen_rss = true;
                }
                "Pss:" => m.pss = bytes,
                "Anonymous:" => m.anonymous = bytes,
                "Pss_Shmem:" => m.pss_shmem = bytes,
                _ => {}
            }
        }
        if !seen_rss {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no Rss: line in smaps_rollup",
            ));
        }
        Ok(m)
    }
}

/// Resident set size from `/proc/self/statm` (cheaper than smaps_rollup).
pub fn statm_rss() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad statm"))?;
    Ok(pages * crate::sys::PAGE_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_rollup() {
        let t = "00400000-7ffd [rollup]\nRss:                1024 kB\nPss:                 512 kB\nPss_Shmem:            4 kB\nAnonymous:           256 kB\n";
        let m = ProcessMemory::parse(t).unwrap();
        assert_eq!(m.rss, 1024 * 1024);
        assert_eq!(m.pss, 512 * 1024);
        assert_eq!(m.anonymous, 256 * 1024);
        assert_eq!(m.pss_shmem, 4096);
        assert!(ProcessMemory::parse("garbage").is_err());
    }

    #[test]
    fn test_current_reads() {
        let m = ProcessMemory::current().unwrap();
        assert!(m.rss > 0 && m.pss > 0);
        assert!(statm_rss().unwrap() > 0);
    }
}
