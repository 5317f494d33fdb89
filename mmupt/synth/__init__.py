"""Synthetic questions (MM-UPT's in-context and direct synthesizing), filtered, for training.

- `prompts`: the prompts of both modes and the parser of the model's reply;
- `filters`: the keep/drop decisions (parse, length, duplicates, self-consistency, image need);
- `pipeline`: generation and filtering through any `mmupt.sampler` (a local model or a rollout server);
- `report`, `output`: the filter report (every generated question accounted for) and the training file;
- `command`: `mmupt synth`; `continual`: synthetic prompts on the fly for the learner.
"""
