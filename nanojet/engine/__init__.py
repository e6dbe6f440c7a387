"""The runtime's engine: requests in, tokens out. The step loop (admission, chunked prefill, one round over
every ready sequence, commit, retirement), the static round and how it runs (eager, compiled, CUDA graphs), the
draft tree, sampling and the paged KV cache."""
