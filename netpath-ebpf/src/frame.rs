//! The packet as the library sees it, whatever program runs: TC programs reach an skb through
//! the kernel's helpers (which also keep checksum offload state right), XDP programs the raw
//! frame through bounds-checked pointers, updating checksums themselves. parse, nat and the
//! rest are written once against [`Frame`]; each entry point brings its own context.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use aya_ebpf::programs::{TcContext, XdpContext};

/// Flags of [`Frame::l4_csum_replace`], as `bpf_l4_csum_replace` takes them: the low bits
/// are the size of the replaced field (2 or 4).
pub const CSUM_PSEUDO_HDR: u64 = BPF_F_PSEUDO_HDR as u64;
pub const CSUM_MANGLED_0: u64 = BPF_F_MARK_MANGLED_0 as u64;

pub trait Frame {
    /// The frame's length in bytes (from the Ethernet header).
    fn len(&self) -> usize;
    /// Reads a `T` at `off`; Err past the end of the frame.
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()>;
    /// Writes `v` at `off`; Err past the end of the frame.
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), ()>;
    /// Updates the IPv4 header checksum at `off` for a `size`-byte field (2 or 4) that went
    /// from `from` to `to` (as `bpf_l3_csum_replace`).
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32, size: u64) -> Result<(), ()>;
    /// Updates the L4 checksum at `off` (as `bpf_l4_csum_replace`; `flags`: size | CSUM_*).
    fn l4_csum_replace(&mut self, off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()>;
    /// The interface the frame arrived on. Read it once per program (see parse::Packet).
    fn ifindex(&self) -> u32;
}

impl Frame for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        TcContext::load(self, off).map_err(|_| ())
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), ()> {
        TcContext::store(self, off, v, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32, size: u64) -> Result<(), ()> {
        TcContext::l3_csum_replace(self, off, u64::from(from), u64::from(to), size).map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace(&mut self, off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()> {
        TcContext::l4_csum_replace(self, off, u64::from(from), u64::from(to), flags).map_err(|_| ())
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the skb pointer is valid for the program run.
        unsafe { (*self.skb.skb).ifindex }
    }
}

/// A pointer to a `T` at `off` in the frame, if the frame holds all of it (the check the
/// verifier wants before any access through a packet pointer).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// Folds a one's complement sum to 16 bits (the sum is never 0 here, so neither is the result).
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), computed as the kernel's csum_replace4 and
/// inet_proto_csum_replace4 do (a 32-bit sum folded), so both datapaths write the same bytes.
/// Words are read as they lie in memory: one's complement sums do not care about byte order.
#[inline(always)]
pub fn csum_replace4(csum: u16, from: u32, to: u32) -> u16 {
    // ~csum_unfold(csum): the complement of the zero-extended checksum, as a 32-bit word.
    let sum = u64::from(!u32::from(csum)) + u64::from(!from) + u64::from(to);
    !fold(sum)
}

/// csum_replace2 as the kernel computes it (16-bit arithmetic, end-around carry).
#[inline(always)]
pub fn csum_replace2(csum: u16, from: u16, to: u16) -> u16 {
    let add = |a: u16, b: u16| {
        let r = a.wrapping_add(b);
        r.wrapping_add(u16::from(r < b))
    };
    !add(add(!csum, !from), to)
}

impl Frame for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let p = ptr_at::<T>(self, off)?;
        // SAFETY: inside the frame (checked above).
        Ok(unsafe { read_packet(p) })
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), ()> {
        let p = ptr_at::<T>(self, off)?;
        // SAFETY: as in load.
        unsafe { p.write_unaligned(*v) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32, size: u64) -> Result<(), ()> {
        let p = ptr_at::<u16>(self, off)?;
        // SAFETY: inside the frame.
        let old = unsafe { p.read_unaligned() };
        let new = if size == 2 { csum_replace2(old, from as u16, to as u16) } else { csum_replace4(old, from, to) };
        // SAFETY: as above.
        unsafe { p.write_unaligned(new) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_replace(&mut self, off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()> {
        let p = ptr_at::<u16>(self, off)?;
        // SAFETY: inside the frame.
        let old = unsafe { p.read_unaligned() };
        // UDP without a checksum keeps none; a computed 0 is sent as 0xffff (RFC 768).
        let mangled = flags & CSUM_MANGLED_0 != 0;
        if mangled && old == 0 {
            return Ok(());
        }
        // The pseudo-header flag changes nothing without checksum offload: a full checksum
        // covers the pseudo-header like any other word. Sizes 2 and 4 are the same sum
        // (the kernel's replace2 zero-extends).
        let mut new = csum_replace4(old, from, to);
        if mangled && new == 0 {
            new = 0xffff;
        }
        // SAFETY: as above.
        unsafe { p.write_unaligned(new) };
        Ok(())
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program run.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

/// Reads a `T` from packet data at `p`, which has no alignment (the IPv4 header follows a
/// 14-byte Ethernet header). `read_unaligned` is right but slow here: LLVM's BPF backend
/// splits it into one load per byte (plus shifts and ors to join them), about a third of
/// uplink_xdp's instructions on a packet it drops. The kernel takes misaligned packet loads
/// (the verifier checks packet alignment only where the CPU needs it, and netpath's
/// programs run where it does not), so this loads 8, 4, 2 bytes at a time in inline
/// assembly, which LLVM cannot split, into an aligned buffer it then keeps in registers.
/// (The target feature that allows misaligned accesses is no way: it applies to the stack
/// too, where the verifier refuses them.)
///
/// SAFETY: `p` must be readable for `size_of::<T>()` bytes (checked against data_end).
#[cfg(target_arch = "bpf")]
#[inline(always)]
unsafe fn read_packet<T: Copy>(p: *const T) -> T {
    use core::arch::asm;
    const { assert!(core::mem::size_of::<T>() <= 32, "header loads only") };
    let p = p.cast::<u8>();
    let n = core::mem::size_of::<T>();
    let mut buf = [0u64; 4];
    let b = buf.as_mut_ptr().cast::<u8>();
    let mut i = 0;
    // SAFETY: every load is inside the `n` bytes the caller vouched for; every store inside
    // `buf` (32 bytes), at offsets aligned for its width.
    unsafe {
        while i + 8 <= n {
            let v: u64;
            asm!("{0} = *(u64 *)({1} + 0)", lateout(reg) v, in(reg) p.add(i), options(pure, nostack, readonly, preserves_flags));
            b.add(i).cast::<u64>().write(v);
            i += 8;
        }
        if i + 4 <= n {
            let v: u64;
            asm!("{0} = *(u32 *)({1} + 0)", lateout(reg) v, in(reg) p.add(i), options(pure, nostack, readonly, preserves_flags));
            b.add(i).cast::<u32>().write(v as u32);
            i += 4;
        }
        if i + 2 <= n {
            let v: u64;
            asm!("{0} = *(u16 *)({1} + 0)", lateout(reg) v, in(reg) p.add(i), options(pure, nostack, readonly, preserves_flags));
            b.add(i).cast::<u16>().write(v as u16);
            i += 2;
        }
        if i < n {
            b.add(i).write(p.add(i).read());
        }
        b.cast::<T>().read_unaligned()
    }
}

/// Off the BPF target (never run: the crate builds only for it) a plain unaligned read.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
unsafe fn read_packet<T: Copy>(p: *const T) -> T {
    // SAFETY: as the caller promised.
    unsafe { p.read_unaligned() }
}
