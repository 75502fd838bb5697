"""Secret rotation: the four-step engine, schedules and rotators."""
