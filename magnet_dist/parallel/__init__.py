"""Process groups, DeepSpeed MoE wiring (expert parallel) and all-reduce helpers.

Import the submodules directly (``magnet_dist.parallel.expert_parallel`` imports DeepSpeed):
- ``groups``: ``init_deepspeed_comm``, ``setup_expert_parallel``, ``validate_ep_size``
- ``expert_parallel``: ``ExpertParallelMoE``, ``MagnetGate``, ``copy_from_dense``
- ``build``: ``build_moe``
- ``reduce``: ``allreduce_gradients``, ``stats_all_reduce``, ``broadcast_parameters``
- ``checkpoint``: ``save_expert_shard``, ``load_expert_shard``, ``dense_state_dict``,
  ``load_dense_state_dict``
"""
