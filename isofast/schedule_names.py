"""The names of the noise schedules, in a module without torch: the command line offers them as choices
without importing torch (`isofast --help` answers at once). `NoiseSchedule.from_name` builds them."""

SCHEDULES = ("linear", "cosine", "scaled_linear")
