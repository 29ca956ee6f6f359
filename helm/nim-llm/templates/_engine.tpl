{{/*
Generated from nim_build/options.py by `python -m nim_build.deploy.chart_sync`: edit there, not here.
nim-llm.engineArgs: the engine values as `nim_build cache-engine` flags, one YAML list item per word: booleans as
--flag / --no-flag, numbers as JSON writes them (never 1e+06), null values left out.
*/}}
{{- define "nim-llm.engineArgs" -}}
{{- $flags := dict
  "quant" "--quant"
  "kvCache" "--kv-cache"
  "tensorParallelSize" "--tp"
  "backend" "--backend"
  "maxBatchSize" "--max-batch-size"
  "maxSeqLen" "--max-seq-len"
  "maxNumTokens" "--max-num-tokens"
  "calibSamples" "--calib-samples"
  "calibSeqLen" "--calib-seq-len"
  "accuracyGate" "--accuracy-gate"
  "minTop1" "--min-top1"
  "maxPplIncrease" "--max-ppl-increase"
  "allowPickle" "--allow-pickle"
  "workers" "--workers" -}}
{{- range $key, $value := .Values.engine }}
{{- $flag := get $flags $key }}
{{- if not $flag }}
{{- fail (printf "engine.%s is not a build option of this chart's nim_build" $key) }}
{{- end }}
{{- if kindIs "bool" $value }}
- {{ ternary $flag (printf "--no-%s" (trimPrefix "--" $flag)) $value | quote }}
{{- else if not (kindIs "invalid" $value) }}
- {{ $flag | quote }}
- {{ ternary $value (toJson $value) (kindIs "string" $value) | quote }}
{{- end }}
{{- end }}
{{- end -}}
