"""The process's CPU threads and memory allocator."""
