"""The one command: settings, data, progress, summary, report, the run itself and stopping it."""
