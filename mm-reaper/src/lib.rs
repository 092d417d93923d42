//! mm-reaper: the OOM killer, OOM reaper and process_mrelease (in progress).
