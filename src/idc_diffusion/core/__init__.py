"""The shared core every stage uses; it imports no stage.

* ``config``: load a workflow config and validate it against ``config/schema.yaml``;
* ``rerun``: which settings each rule tracks (a change reruns it) and which only decide how a
  job runs;
* ``captions``: the caption vocabulary and templates (prepare writes captions with it, sample
  renders prompts, evaluate reads the fields back, config checks templates);
* ``hashing``, ``rows``, ``progress``, ``owner``: stable hashes, cohort row reading, a
  shard's progress lines, one writer per output folder.
"""
