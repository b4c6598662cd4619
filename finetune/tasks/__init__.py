"""The losses of the preference tasks, from the model's outputs: rm (a reward model's scores of
chosen and rejected answers) and dpo (their log-probabilities under the policy and a reference).
The model side (which forward, which head) is finetune.heads.TaskModel."""
