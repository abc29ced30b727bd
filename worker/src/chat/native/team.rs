//! A persistent team of inference threads.
//!
//! A decode step of a small model is a few hundred matrix products of a few
//! microseconds each, so the cost of starting parallel work matters as much as
//! the work. The team's threads spin briefly between tasks, so the next task of
//! the same step starts in well under a microsecond, then sleep on a condition
//! variable, so an idle worker costs nothing.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle thread spins for the next task before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

type Task = *const (dyn Fn(usize) + Sync);

struct Shared {
    size: usize,
    /// Bumped once per task; threads run the task when they see it change.
    generation: AtomicUsize,
    /// Written only by `run` before it bumps `generation`, read only after.
    task: UnsafeCell<Option<Task>>,
    /// Helper threads still running the current task.
    pending: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Helpers asleep (or about to be) on `wake`: `run` takes the lock and
    /// wakes them only when there are some, so a step's hundreds of tasks
    /// cost no system call while the helpers spin.
    sleeping: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `task` is only written while no helper reads it (between tasks, when
// `pending` is 0) and published through the `generation` release/acquire pair.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `size` threads: the caller of [`Team::run`] and `size - 1` helpers.
    pub fn new(size: usize) -> Team {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            size,
            generation: AtomicUsize::new(0),
            task: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (1..size)
            .map(|id| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("natter-infer-{id}"))
                    .spawn(move || helper(&shared, id))
                    .expect("cannot start an inference thread")
            })
            .collect();
        Team { shared, helpers }
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Runs `task(thread_index)` on every thread of the team and returns when all
    /// are done. A panic on any thread is raised here.
    pub fn run(&self, task: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;
        if shared.size == 1 {
            task(0);
            return;
        }
        // SAFETY: the pointer is used only until every helper has finished it,
        // which the `Wait` guard below ensures even if `task(0)` panics.
        let erased: Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(task) };
        unsafe { *shared.task.get() = Some(erased) };
        shared.pending.store(shared.size - 1, Ordering::Relaxed);
        // SeqCst pairs with the helper's: either it sees the new generation
        // before it sleeps, or this sees it counted as sleeping.
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            drop(shared.sleep.lock().unwrap_or_else(|e| e.into_inner()));
            shared.wake.notify_all();
        }

        struct Wait<'a>(&'a Shared);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let wait = Wait(shared);
        task(0);
        drop(wait);
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("an inference thread panicked");
        }
    }
}

fn helper(shared: &Shared, id: usize) {
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleeping.fetch_add(1, Ordering::SeqCst);
            if shared.generation.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
                drop(shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            } else {
                drop(guard);
            }
            shared.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: published by `run` before the generation bump seen above.
        let task = unsafe { (*shared.task.get()).expect("a task is set before each generation") };
        if catch_unwind(AssertUnwindSafe(|| unsafe { (*task)(id) })).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        drop(self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

/// Thread `id`'s share of `0..len` out of `threads`, in whole multiples of
/// `align` (except at the end).
pub fn share(len: usize, id: usize, threads: usize, align: usize) -> Range<usize> {
    let units = len.div_ceil(align);
    let per = units / threads;
    let extra = units % threads;
    let start = id * per + id.min(extra);
    let end = start + per + usize::from(id < extra);
    (start * align).min(len)..(end * align).min(len)
}

/// Work in `0..len`, handed out `chunk` at a time to whichever thread asks
/// next. The vCPUs of a small VM do not run at one speed, and with fixed shares
/// every task would wait for the slowest; a thread that falls behind simply
/// takes fewer chunks.
pub struct Cursor {
    next: AtomicUsize,
    len: usize,
    chunk: usize,
}

impl Cursor {
    pub fn new(len: usize, chunk: usize) -> Cursor {
        Cursor { next: AtomicUsize::new(0), len, chunk: chunk.max(1) }
    }

    /// The next chunk nobody has taken, or `None` when all are taken.
    pub fn take(&self) -> Option<Range<usize>> {
        let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
        (start < self.len).then(|| start..(start + self.chunk).min(self.len))
    }
}

/// A buffer several threads write in disjoint parts of.
pub struct Shards<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: callers only ever take disjoint ranges (see `part`).
unsafe impl<T: Send> Sync for Shards<'_, T> {}

impl<'a, T> Shards<'a, T> {
    pub fn new(data: &'a mut [T]) -> Self {
        Shards { ptr: data.as_mut_ptr(), len: data.len(), _borrow: std::marker::PhantomData }
    }

    /// # Safety
    /// No two live results may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_task_and_shares_cover_the_range() {
        let team = Team::new(3);
        let hits = AtomicUsize::new(0);
        for _ in 0..1000 {
            team.run(&|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 3000);
        for (len, align) in [(10, 1), (577, 4), (3, 4), (0, 1)] {
            let parts: Vec<_> = (0..3).map(|id| share(len, id, 3, align)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[2].end, len);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn a_cursor_hands_out_each_chunk_once() {
        let team = Team::new(2);
        for (len, chunk) in [(100, 8), (7, 1), (0, 4), (5, 16)] {
            let cursor = Cursor::new(len, chunk);
            let taken = std::sync::Mutex::new(Vec::new());
            team.run(&|_| {
                while let Some(r) = cursor.take() {
                    taken.lock().unwrap().push(r);
                }
            });
            let mut taken = taken.into_inner().unwrap();
            taken.sort_by_key(|r| r.start);
            assert_eq!(taken.iter().map(|r| r.len()).sum::<usize>(), len);
            assert!(taken.windows(2).all(|w| w[0].end == w[1].start));
            assert!(taken.iter().all(|r| r.start % chunk == 0 && !r.is_empty()));
        }
    }

    #[test]
    fn a_panic_on_a_helper_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2);
        let caught = catch_unwind(AssertUnwindSafe(|| team.run(&|id| assert_ne!(id, 1, "boom"))));
        assert!(caught.is_err());
        let hits = AtomicUsize::new(0);
        team.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
