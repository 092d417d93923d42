//! [`counters!`](crate::counters): a struct of relaxed `AtomicU64`
//! counters and its snapshot into a public stats struct, from one list of
//! field names.

/// Declares a struct of `AtomicU64` counters (`Default`, `Debug`, fields
/// `pub(crate)`) and its `snapshot(rest)`: each counter loaded `Relaxed`
/// into the field of the same name of the stats struct, every other field
/// taken from `rest`.
///
/// ```
/// #[derive(Default)]
/// pub struct Stats { pub hits: u64, pub misses: u64, pub alive: bool }
///
/// mm_core::counters! {
///     struct Counters -> Stats { hits, misses }
/// }
///
/// let c = Counters::default();
/// c.hits.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
/// let s = c.snapshot(Stats { alive: true, ..Stats::default() });
/// assert_eq!((s.hits, s.misses, s.alive), (2, 0, true));
/// ```
#[macro_export]
macro_rules! counters {
    ($(#[$meta:meta])* $vis:vis struct $name:ident -> $stats:ident { $($field:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $(pub(crate) $field: ::std::sync::atomic::AtomicU64,)+
        }

        impl $name {
            /// Every counter, loaded `Relaxed` one after the other (no
            /// consistent cut), into `rest`.
            #[allow(clippy::needless_update, dead_code)]
            $vis fn snapshot(&self, rest: $stats) -> $stats {
                $stats {
                    $($field: self.$field.load(::std::sync::atomic::Ordering::Relaxed),)+
                    ..rest
                }
            }
        }
    };
}
