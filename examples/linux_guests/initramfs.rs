//! The guests' initramfs, built at run time: an uncompressed cpio "newc"
//! archive (the format `Documentation/driver-api/early-userspace/
//! buffer-format.rst` describes; the kernel unpacks it into its rootfs)
//! with Debian's static busybox and the init script below.
//!
//! The init script talks to the VMM in lines on the console (`vmm.rs`
//! parses them): a boot marker, a heartbeat every ~100 ms, the checksum of
//! a file written before any merge and then its recomputation every
//! 2 s, and one line per memory fill step (`dd` of random bytes into a
//! tmpfs, so each step is new memory the host must find).
//! Parameters come from the kernel command line: unknown `key=value`
//! words become init's environment (`gm_steps`, `gm_step_mib`,
//! `gm_step_ms`, `gm_start_ms`).

/// The init script (PID 1). Never exits (the kernel would panic).
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t tmpfs -o size=90% tmpfs /mnt
echo "@@BOOTED"
# A file that is the same in every guest, written before any merge: its
# pages are merged by the host's KSM; the checksum must not change.
for i in 1 2 3 4; do cat /bin/busybox; done > /mnt/check
ck0=$(md5sum /mnt/check | cut -d' ' -f1)
echo "@@CK0 $ck0"
( n=0; while :; do n=$((n+1)); echo "@@HB $n"; usleep 100000; done ) &
( while :; do sleep 2; c=$(md5sum /mnt/check | cut -d' ' -f1)
  if [ "$c" = "$ck0" ]; then echo "@@CKOK"; else echo "@@CKBAD $c"; fi; done ) &
usleep $(( ${gm_start_ms:-0} * 1000 ))
s=0
while [ $s -lt ${gm_steps:-0} ]; do
  dd if=/dev/urandom of=/mnt/fill$s bs=1M count=${gm_step_mib:-8} 2>/dev/null
  s=$((s+1))
  echo "@@FILL $s"
  usleep $(( ${gm_step_ms:-100} * 1000 ))
done
echo "@@FILLED"
while :; do sleep 3600; done
"#;

/// One cpio newc entry.
fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,                                        // uid
        0,                                        // gid
        if mode & 0o040000 != 0 { 2 } else { 1 }, // nlink
        0,                                        // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The archive: directories, `/dev/console` (the kernel opens it for init
/// before any devtmpfs), `/bin/busybox`, `/init`.
pub fn build(busybox: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(busybox.len() + 4096);
    let mut ino = 1;
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt"] {
        entry(&mut out, ino, d, 0o040755, (0, 0), &[]);
        ino += 1;
    }
    entry(&mut out, ino, "dev/console", 0o020600, (5, 1), &[]);
    entry(&mut out, ino + 1, "bin/busybox", 0o100755, (0, 0), busybox);
    entry(&mut out, ino + 2, "init", 0o100755, (0, 0), INIT.as_bytes());
    entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    // The kernel reads the archive in 512-byte blocks' worth; pad as cpio
    // does.
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    /// One entry read back: name, mode, rdev (major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads the archive back as the kernel's unpacker does, up to the
    /// trailer.
    fn parse(a: &[u8]) -> Vec<Entry> {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&a[at..at + 6], b"070701", "magic at {at}");
            let f = |i: usize| hex(&a[at + 6 + 8 * i..at + 14 + 8 * i]);
            let (mode, size, rdev, namesize) = (f(1), f(6) as usize, (f(9), f(10)), f(11) as usize);
            let name = std::str::from_utf8(&a[at + 110..at + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(a[at + 110 + namesize - 1], 0, "name NUL-terminated");
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, rdev, a[data_at..data_at + size].to_vec()));
            at = (data_at + size).next_multiple_of(4);
        }
    }

    #[test]
    fn test_archive_reads_back() {
        let a = super::build(b"busybox bytes");
        assert_eq!(a.len() % 512, 0);
        let e = parse(&a);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "proc",
                "sys",
                "tmp",
                "mnt",
                "dev/console",
                "bin/busybox",
                "init"
            ]
        );
        let console = &e[6];
        assert_eq!((console.1, console.2), (0o020600, (5, 1)));
        assert_eq!(e[7].3, b"busybox bytes");
        assert_eq!(e[7].1, 0o100755);
        assert_eq!(e[8].3, super::INIT.as_bytes());
        assert!(super::INIT.starts_with("#!/bin/busybox sh\n"));
    }
}
