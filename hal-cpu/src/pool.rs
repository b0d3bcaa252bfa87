//! A persistent pool of worker threads, one per core, that runs one borrowed job at a time.
//!
//! [`Pool::run`] offers every thread (the caller is thread 0) the same `&dyn Fn(usize)` and returns
//! when every thread that took it is done, so the job may borrow the caller's stack. A worker
//! that has not picked the job up by the time the caller finished its own part is shut out (the
//! job's work is handed out in [`Chunks`], so the threads present did it all): a worker the OS
//! has preempted costs its chunk in flight at most, never a wait for it to be scheduled again.
//! Workers spin briefly between jobs (a decode step submits a few hundred small ops back to back)
//! and then sleep on a condition variable, so an idle pool costs nothing.
//!
//! With a pin list, thread `i` (the caller is 0) is bound to CPU `pins[i % len]` when the pool
//! starts ([`Pool::pinned`]; the order comes from [`crate::topology`]).
//!
//! The job's lifetime is erased to hand it to the workers: that, [`Disjoint`] (threads writing
//! disjoint parts of one output) and the affinity system calls ([`affinity`], [`pin_current_thread`])
//! are the module's only `unsafe`.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

/// Set in `gate` once the caller stops admitting workers to the current job.
const CLOSED: u64 = 1 << 31;
const ADMITTED: u64 = CLOSED - 1;

/// How long a worker spins for the next job before it sleeps: long enough to stay hot between the
/// ops of a step, short enough not to steal a core from other work between steps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

struct Shared {
    /// The current job, as a pointer to the caller's `&dyn Fn` (a thin pointer, so one atomic
    /// holds it): set before `generation` is bumped, cleared after every worker is done. An
    /// atomic, not a lock: sixteen workers taking a lock at once would queue (and sleep) on it.
    job: AtomicPtr<&'static Job>,
    generation: AtomicU64,
    /// Admission to the current job: `generation << 32 | CLOSED | workers admitted`.
    gate: AtomicU64,
    /// Admitted workers that have finished the current job.
    done: AtomicUsize,
    panicked: AtomicBool,
    quit: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

/// The pool. Dropping it stops and joins the workers.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

impl Pool {
    /// A pool of `threads` threads in all (the caller counts as one; `threads >= 1`).
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        Pool::pinned(threads, &[])
    }

    /// As [`new`](Self::new), thread `i` bound to CPU `pins[i % pins.len()]` (the calling thread
    /// too, as thread 0); `pins` empty: no binding. A binding the OS refuses is an error.
    pub fn pinned(threads: usize, pins: &[usize]) -> std::io::Result<Pool> {
        let pin_of = |i: usize| (!pins.is_empty()).then(|| pins[i % pins.len()]);
        if let Some(cpu) = pin_of(0) {
            pin_current_thread(cpu)?;
        }
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            gate: AtomicU64::new(CLOSED),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        for id in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            let (tx, pin) = (tx.clone(), pin_of(id));
            let h = std::thread::Builder::new().name(format!("purehw-cpu-{id}")).spawn(move || {
                if let Some(cpu) = pin {
                    let _ = tx.send(pin_current_thread(cpu));
                }
                drop(tx);
                worker(&s, id)
            })?;
            workers.push(h);
        }
        drop(tx);
        let pool = Pool { shared, workers };
        // Every worker's binding, before any job runs (a refused one stops the pool on drop).
        for r in rx {
            r?;
        }
        Ok(pool)
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `job(i)` on the caller (`i = 0`) and on each worker `i` that picks it up before the caller
    /// has finished its own part; wait for those. Jobs hand out their work in [`Chunks`], so every
    /// chunk is done whichever threads took part (each at most once).
    /// A panic in any thread is re-raised here after all admitted threads have finished.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            job(0);
            return;
        }
        let s = &*self.shared;
        // SAFETY: the erased pointer is only dereferenced by workers admitted through `gate`,
        // between their admission and their `done` increment, and this function does not return
        // (normally or by unwinding: the caller's own part runs under catch_unwind) before it has
        // closed the gate and every admitted worker has incremented `done`; so `job` outlives
        // every use.
        let job: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        // The reference itself lives on this frame, which outlives the job as `job` does.
        s.job.store((&job as *const &'static Job).cast_mut(), SeqCst);
        s.done.store(0, SeqCst);
        let generation = s.generation.load(SeqCst).wrapping_add(1);
        s.gate.store((generation & 0xFFFF_FFFF) << 32, SeqCst);
        s.generation.store(generation, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = lock(&s.sleep);
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let admitted = (s.gate.fetch_or(CLOSED, SeqCst) & ADMITTED) as usize;
        let mut spins = 0u32;
        while s.done.load(SeqCst) < admitted {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.job.store(std::ptr::null_mut(), SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a purehw-cpu worker thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.quit.store(true, SeqCst);
        self.shared.generation.fetch_add(1, SeqCst);
        {
            let _g = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), ascending; `None` where the
/// OS does not say.
#[cfg(target_os = "linux")]
pub fn affinity() -> Option<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain bit array, valid all zero.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is the set's own and the pointer is to it.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return None;
    }
    // SAFETY: every index is below CPU_SETSIZE, the set's size in bits.
    Some((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

#[cfg(not(target_os = "linux"))]
pub fn affinity() -> Option<Vec<usize>> {
    None
}

/// Bind the calling thread to `cpu` (`sched_setaffinity`).
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("CPU {cpu} is beyond the set size")));
    }
    // SAFETY: `cpu_set_t` is a plain bit array, valid all zero.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the size is the set's own and the pointer is to it.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("binding a thread to CPU {cpu}: {e}")));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: usize) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "binding threads to CPUs is supported on Linux only"))
}

/// A poisoned lock only means another thread panicked while holding it; the data is `()` or a
/// pointer slot, still valid.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(s: &Shared, id: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin, then sleep.
        let mut spins = 0u32;
        let mut since: Option<std::time::Instant> = None;
        while s.generation.load(SeqCst) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || since.get_or_insert_with(std::time::Instant::now).elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = lock(&s.sleep);
            s.sleepers.fetch_add(1, SeqCst);
            while s.generation.load(SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        }
        seen = s.generation.load(SeqCst);
        if s.quit.load(SeqCst) {
            return;
        }
        if !admit(&s.gate, seen) {
            continue; // the caller finished without this thread
        }
        let p = s.job.load(SeqCst);
        if !p.is_null() {
            // SAFETY: `run` stored `p` (a reference on its frame to the job) before opening
            // generation `seen`, and keeps both alive until this admitted thread increments
            // `done` below.
            let f: &Job = unsafe { *p };
            if catch_unwind(AssertUnwindSafe(|| f(id))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.done.fetch_add(1, SeqCst);
    }
}

/// Join generation `seen`'s job if its gate is still open (and not already a later one's).
fn admit(gate: &AtomicU64, seen: u64) -> bool {
    let mut cur = gate.load(SeqCst);
    loop {
        if cur >> 32 != seen & 0xFFFF_FFFF || cur & CLOSED != 0 {
            return false;
        }
        match gate.compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// An output slice that several threads write in disjoint parts.
pub struct Disjoint<'a, T = f32> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: it is a `&mut [T]` split by contract: callers of `part` guarantee disjointness.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
// SAFETY: as above; parts are only handed out as `&mut`, so `T: Send` suffices.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        Disjoint { ptr: s.as_mut_ptr(), len: s.len(), _borrow: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `start..start + len` of the output.
    ///
    /// # Safety
    /// No two live parts (from any thread) may overlap.
    #[allow(clippy::mut_from_ref)] // the point of the type: disjoint parts of one &mut
    pub unsafe fn part(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start <= self.len && len <= self.len - start, "part {start}+{len} of {}", self.len);
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Hands out `0..n` in chunks of `chunk` to whichever thread asks next.
pub struct Chunks {
    next: AtomicUsize,
    n: usize,
    chunk: usize,
}

impl Chunks {
    pub fn new(n: usize, chunk: usize) -> Self {
        Chunks { next: AtomicUsize::new(0), n, chunk: chunk.max(1) }
    }
}

impl Iterator for &Chunks {
    type Item = std::ops::Range<usize>;
    fn next(&mut self) -> Option<Self::Item> {
        let s = self.next.fetch_add(self.chunk, SeqCst);
        (s < self.n).then(|| s..(s + self.chunk).min(self.n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Each thread id at most once, the caller always; every chunk exactly once.
    #[test]
    fn every_chunk_is_done_once_by_the_threads_that_take_part() {
        let pool = Pool::new(3).unwrap();
        for round in 0..300 {
            let seen = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
            let mut out = vec![0f32; 1000];
            let d = Disjoint::new(&mut out);
            let chunks = Chunks::new(1000, 7);
            pool.run(&|i| {
                seen[i].fetch_add(1, SeqCst);
                for r in &chunks {
                    // SAFETY: chunks are disjoint.
                    let p = unsafe { d.part(r.start, r.len()) };
                    for (i, o) in r.zip(p) {
                        *o += (i + round) as f32;
                    }
                }
            });
            assert_eq!(seen[0].load(SeqCst), 1);
            assert!(seen.iter().all(|s| s.load(SeqCst) <= 1));
            assert!(out.iter().enumerate().all(|(i, &v)| v == (i + round) as f32));
            if round % 50 == 0 {
                std::thread::sleep(Duration::from_millis(30)); // let workers fall asleep
            }
        }
    }

    /// Wait (up to 10 s, for a loaded machine) until `n` threads have checked in.
    fn wait_for(c: &AtomicUsize, n: usize) {
        let t = std::time::Instant::now();
        while c.load(SeqCst) < n && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Run a job whose caller part waits for every thread; how many took part.
    fn run_all(pool: &Pool) -> usize {
        let hits = AtomicUsize::new(0);
        pool.run(&|i| {
            hits.fetch_add(1, SeqCst);
            if i == 0 {
                wait_for(&hits, pool.threads());
            }
        });
        hits.load(SeqCst)
    }

    /// A job long enough for the workers to wake is shared by all of them.
    #[test]
    fn workers_take_part_in_long_jobs() {
        let pool = Pool::new(3).unwrap();
        std::thread::sleep(Duration::from_millis(30)); // asleep: woken by the job
        for _ in 0..3 {
            assert_eq!(run_all(&pool), 3);
        }
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_survives() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            let started = AtomicUsize::new(0);
            pool.run(&|i| {
                started.fetch_add(1, SeqCst);
                if i == 0 {
                    wait_for(&started, 2); // let worker 1 take part
                }
                assert_ne!(i, 1)
            })
        }));
        assert!(r.is_err());
        assert_eq!(run_all(&pool), 2);
    }
}
