"""The GPU node as it is (docs/GPU.md): its declared software (inventory), the offline wheel bundle
of what the check needs and the node lacks (bundle), what the check's code imports (imports), and
the CPU rehearsal against the node's exact packages (rehearsal)."""
