//! Commands written straight into one buffer in the Redis protocol (RESP),
//! for the shard writes: a write of tens of thousands of leads built with
//! `redis::Cmd` and `redis::Pipeline` allocates a key string per lead, grows
//! each command's buffer, and packs them all again into a new buffer of
//! megabytes whose fresh pages the kernel zeroes on every flush. Here each
//! argument is written once, in place, into a buffer the next write reuses.

/// Commands packed one after another.
#[derive(Debug, Default)]
pub struct Packed {
    buf: Vec<u8>,
    commands: usize,
    /// Arguments the command being packed still expects (a miscount would
    /// make Redis read the rest of the stream wrongly: checked in tests).
    pending: usize,
}

impl Packed {
    /// Empties it, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.commands = 0;
        self.pending = 0;
    }

    /// Starts a command of `args` arguments, its name included; exactly
    /// that many arguments ([`Packed::arg`], [`Packed::arg_parts`],
    /// [`Packed::arg_int`]) must follow.
    pub fn command(&mut self, args: usize) -> &mut Self {
        debug_assert_eq!(
            self.pending, 0,
            "a command got fewer arguments than it announced"
        );
        self.commands += 1;
        self.pending = args;
        self.header(b'*', args);
        self
    }

    /// One argument.
    pub fn arg(&mut self, bytes: &[u8]) -> &mut Self {
        self.arg_parts(&[bytes])
    }

    /// One argument made of `parts` end to end (a key and its prefix),
    /// without joining them first.
    pub fn arg_parts(&mut self, parts: &[&[u8]]) -> &mut Self {
        debug_assert!(
            self.pending > 0,
            "a command got more arguments than it announced"
        );
        self.pending = self.pending.saturating_sub(1);
        self.header(b'$', parts.iter().map(|p| p.len()).sum());
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    /// An integer argument, in decimal.
    pub fn arg_int(&mut self, v: i64) -> &mut Self {
        let mut digits = itoa::Buffer::new();
        self.arg(digits.format(v).as_bytes())
    }

    fn header(&mut self, kind: u8, n: usize) {
        self.buf.push(kind);
        let mut digits = itoa::Buffer::new();
        self.buf.extend_from_slice(digits.format(n).as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// The commands, packed.
    pub fn bytes(&self) -> &[u8] {
        debug_assert_eq!(
            self.pending, 0,
            "a command got fewer arguments than it announced"
        );
        &self.buf
    }

    /// How many commands it holds.
    pub fn commands(&self) -> usize {
        self.commands
    }

    /// Gives the buffer back if it grew beyond `bytes` (an unusually large
    /// write), so one burst does not stay held for good.
    pub fn shrink(&mut self, bytes: usize) {
        if self.buf.capacity() > bytes {
            self.buf = Vec::new();
        }
    }
}

/// `MULTI`, the commands `body` packs, `EXEC`: one transaction.
pub fn transaction(p: &mut Packed, body: impl FnOnce(&mut Packed)) {
    p.clear();
    p.command(1).arg(b"MULTI");
    body(p);
    p.command(1).arg(b"EXEC");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What it packs is byte for byte what redis-rs packs for the same
    /// commands and transaction.
    #[test]
    fn packs_as_redis_rs_does() {
        let state = [0u8, 1, 2, 255, b'\r', b'\n'];
        let mut p = Packed::default();
        transaction(&mut p, |p| {
            p.command(5)
                .arg(b"MSET")
                .arg_parts(&[b"leadscore:{p3}:", b"l:L1"])
                .arg(&state)
                .arg_parts(&[b"leadscore:{p3}:", b"", b"a:v9"])
                .arg(b"");
            p.command(4)
                .arg(b"ZADD")
                .arg(b"leadscore:{p3}:timers")
                .arg_int(-1_790_000_000_000)
                .arg(b"l:L1");
        });
        assert_eq!(p.commands(), 4);

        let mut mset = redis::cmd("MSET");
        mset.arg("leadscore:{p3}:l:L1")
            .arg(&state[..])
            .arg("leadscore:{p3}:a:v9")
            .arg("");
        let mut zadd = redis::cmd("ZADD");
        zadd.arg("leadscore:{p3}:timers")
            .arg(-1_790_000_000_000i64)
            .arg("l:L1");
        let mut tx = redis::pipe();
        tx.atomic().add_command(mset).add_command(zadd);
        assert_eq!(p.bytes(), &tx.get_packed_pipeline()[..]);

        // Cleared, it packs the next write from the start.
        p.clear();
        p.command(2).arg(b"DEL").arg_int(7);
        assert_eq!(
            p.bytes(),
            &redis::cmd("DEL").arg(7).get_packed_command()[..]
        );
        assert_eq!(p.commands(), 1);
    }

    /// A miscounted command is caught where it is packed (in tests and
    /// debug builds), not by Redis misreading everything after it.
    #[cfg(debug_assertions)]
    #[test]
    fn a_miscounted_command_is_caught_where_it_is_packed() {
        let fewer = std::panic::catch_unwind(|| {
            let mut p = Packed::default();
            p.command(3).arg(b"DEL").arg(b"k");
            p.command(1).arg(b"EXEC");
        });
        assert!(fewer.is_err());
        let more = std::panic::catch_unwind(|| {
            let mut p = Packed::default();
            p.command(2).arg(b"DEL").arg(b"k").arg(b"extra");
        });
        assert!(more.is_err());
        let unfinished = std::panic::catch_unwind(|| {
            let mut p = Packed::default();
            p.command(2).arg(b"DEL");
            p.bytes().len()
        });
        assert!(unfinished.is_err());
    }
}
