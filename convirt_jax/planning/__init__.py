"""The plan job: a job's train step compiled for TPUs and GPUs on a machine without them."""
