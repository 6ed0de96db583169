"""The jobs' exit codes, in a module of their own so that small CLIs (jobs.registry) need not import Ray."""

EXIT_OK = 0
EXIT_CONFIG, EXIT_DATA, EXIT_TRAIN, EXIT_EVAL = 2, 3, 4, 5
EXIT_GATE, EXIT_PROMOTE = 6, 7  # jobs.nightly: candidate rejected; publishing or promotion failed
EXIT_STORAGE = 8  # the object store failed (credentials, permission, endpoint, throttling): not the data
EXIT_STOPPED = 143  # SIGTERM (`ray job stop`, preemption): checkpointed, resumable with --resume
