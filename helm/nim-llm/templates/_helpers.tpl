{{/*
nim-llm.name: the chart name (or nameOverride), trimmed to 63 characters.
*/}}
{{- define "nim-llm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
nim-llm.fullname: prefix of every resource name: fullnameOverride, or RELEASE-NAME (RELEASE alone when it
already contains the name), trimmed to 63 characters.
*/}}
{{- define "nim-llm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
nim-llm.fullnameWith: "FULLNAME-SUFFIX" for dependent objects, the full name shortened so the result stays
within 63 characters. Call with (list $ "suffix").
*/}}
{{- define "nim-llm.fullnameWith" -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "nim-llm.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/*
nim-llm.chart: chart name and version for the helm.sh/chart label.
*/}}
{{- define "nim-llm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
nim-llm.selectorLabels: the immutable labels that select this release's pods.
*/}}
{{- define "nim-llm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nim-llm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
nim-llm.labels: labels of every resource.
*/}}
{{- define "nim-llm.labels" -}}
helm.sh/chart: {{ include "nim-llm.chart" . }}
{{ include "nim-llm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
nim-llm.serviceAccountName: the ServiceAccount the pods run as.
*/}}
{{- define "nim-llm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nim-llm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
nim-llm.image: the serving image reference; a digest wins over the tag, the tag defaults to appVersion.
*/}}
{{- define "nim-llm.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
nim-llm.claimName: the PVC holding the model cache (existing or created by the chart).
*/}}
{{- define "nim-llm.claimName" -}}
{{- default (include "nim-llm.fullnameWith" (list . "cache")) .Values.persistence.existingClaim -}}
{{- end -}}

{{/*
nim-llm.newClaim: "true" when the chart creates the cache PVC (a PersistentVolumeClaim or, for a StatefulSet,
a volumeClaimTemplate).
*/}}
{{- define "nim-llm.newClaim" -}}
{{- if and .Values.persistence.enabled (not .Values.persistence.existingClaim) -}}true{{- end -}}
{{- end -}}

{{/*
nim-llm.claimSpec: spec of the cache PVC the chart creates.
*/}}
{{- define "nim-llm.claimSpec" -}}
accessModes:
  - {{ .Values.persistence.accessMode }}
{{- with .Values.persistence.storageClass }}
storageClassName: {{ . | quote }}
{{- end }}
resources:
  requests:
    storage: {{ default "100Gi" .Values.persistence.size | quote }}
{{- end -}}

{{/*
nim-llm.resources: container resources; the GPU limit is engine.tensorParallelSize.
*/}}
{{- define "nim-llm.resources" -}}
{{- $res := deepCopy (default dict .Values.resources) -}}
{{- if .Values.gpu.enabled -}}
{{- $limits := default dict (get $res "limits") -}}
{{- $gpus := ternary .Values.multiNode.gpusPerNode .Values.engine.tensorParallelSize .Values.multiNode.enabled -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/*
nim-llm.mpiEnv: the group's shared token and the workers' port (multiNode: leader and workers).
*/}}
{{- define "nim-llm.mpiEnv" -}}
- name: NIM_BUILD_MPI_PORT
  value: {{ .Values.multiNode.port | quote }}
- name: NIM_BUILD_MPI_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nim-llm.fullnameWith" (list . "mpi") }}
      key: token
{{- end -}}

{{/*
nim-llm.commonEnv: environment of the init and serving containers.
*/}}
{{- define "nim-llm.commonEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: NIM_CACHE_DIR
  value: {{ .Values.persistence.mountPath | quote }}
- name: NIM_REPO_DIR
  value: /tmp/nim/repo
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
nim-llm.validateValues: collects every inconsistent setting and fails with one message listing them.
*/}}
{{- define "nim-llm.validateValues" -}}
{{- $errors := list -}}
{{- $v := .Values -}}
{{- if and (not $v.gpu.enabled) (eq $v.engine.backend "trtllm") -}}
{{- $errors = append $errors "engine.backend=trtllm needs gpu.enabled=true (use engine.backend=reference on CPU)" -}}
{{- end -}}
{{- if $v.multiNode.enabled -}}
{{- if ne (int $v.engine.tensorParallelSize) (mul $v.multiNode.size $v.multiNode.gpusPerNode | int) -}}
{{- $errors = append $errors (printf "multiNode: engine.tensorParallelSize (%v) must be multiNode.size x multiNode.gpusPerNode (%v)" $v.engine.tensorParallelSize (mul $v.multiNode.size $v.multiNode.gpusPerNode)) -}}
{{- end -}}
{{- if not (.Capabilities.APIVersions.Has "leaderworkerset.x-k8s.io/v1") -}}
{{- $errors = append $errors "multiNode needs the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1), which this cluster does not serve: install LWS (https://lws.sigs.k8s.io/docs/installation/)" -}}
{{- end -}}
{{- if $v.autoscaling.enabled -}}
{{- $errors = append $errors "multiNode does not autoscale: set autoscaling.enabled=false and scale replicaCount (groups)" -}}
{{- end -}}
{{- if not $v.gpu.enabled -}}
{{- $errors = append $errors "multiNode serves a TensorRT-LLM engine over GPUs: gpu.enabled=true" -}}
{{- end -}}
{{- if and $v.persistence.enabled (not $v.persistence.existingClaim) (ne $v.persistence.accessMode "ReadWriteMany") -}}
{{- $errors = append $errors "multiNode pods on several nodes share the cache volume: persistence.accessMode=ReadWriteMany, or an existingClaim that is" -}}
{{- end -}}
{{- end -}}
{{- if and $v.model.store (not $v.persistence.enabled) -}}
{{- $errors = append $errors "model.store needs the store on the cache volume: persistence.enabled=true, with persistence.existingClaim holding it" -}}
{{- end -}}
{{- if and (not $v.gpu.enabled) $v.gpu.products -}}
{{- $errors = append $errors "gpu.products is set but gpu.enabled=false" -}}
{{- end -}}
{{- range $kind := list "requests" "limits" -}}
{{- if hasKey (default dict (get (default dict $v.resources) $kind)) "nvidia.com/gpu" -}}
{{- $errors = append $errors (printf "resources.%s sets nvidia.com/gpu: set engine.tensorParallelSize instead (the GPU count per pod)" $kind) -}}
{{- end -}}
{{- end -}}
{{- $maxReplicas := ternary $v.autoscaling.maxReplicas $v.replicaCount $v.autoscaling.enabled -}}
{{- if and (eq $v.workload.kind "Deployment") (include "nim-llm.newClaim" .) (ne $v.persistence.accessMode "ReadWriteMany") (gt (int $maxReplicas) 1) -}}
{{- $errors = append $errors (printf "a Deployment with up to %d replicas cannot share a new %s cache volume: set persistence.accessMode=ReadWriteMany, workload.kind=StatefulSet (one cache per replica) or persistence.existingClaim" (int $maxReplicas) $v.persistence.accessMode) -}}
{{- end -}}
{{- if and (eq $v.workload.kind "Deployment") (include "nim-llm.newClaim" .) (ne $v.persistence.accessMode "ReadWriteMany") (eq $v.workload.deploymentStrategy "RollingUpdate") -}}
{{- $errors = append $errors (printf "workload.deploymentStrategy=RollingUpdate starts the new pod while the old one holds the %s cache volume: use Recreate or persistence.accessMode=ReadWriteMany" $v.persistence.accessMode) -}}
{{- end -}}
{{- if and $v.huggingface.offline (not $v.persistence.existingClaim) -}}
{{- $errors = append $errors "huggingface.offline=true needs a pre-populated cache: set persistence.existingClaim" -}}
{{- end -}}
{{- if and $v.huggingface.offline $v.huggingface.tokenSecret.name -}}
{{- $errors = append $errors "huggingface.tokenSecret.name is set but huggingface.offline=true never uses it" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- $errors = append $errors (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if $v.pdb.enabled -}}
{{- if and (not (kindIs "invalid" $v.pdb.minAvailable)) (not (kindIs "invalid" $v.pdb.maxUnavailable)) -}}
{{- $errors = append $errors "set only one of pdb.minAvailable and pdb.maxUnavailable (set the other to null)" -}}
{{- else if and (kindIs "invalid" $v.pdb.minAvailable) (kindIs "invalid" $v.pdb.maxUnavailable) -}}
{{- $errors = append $errors "pdb.enabled=true needs pdb.minAvailable or pdb.maxUnavailable" -}}
{{- end -}}
{{- end -}}
{{- $ports := $v.service.ports -}}
{{- if ne (len (uniq (list (int $ports.http) (int $ports.grpc) (int $ports.metrics) (int $ports.openai)))) 4 -}}
{{- $errors = append $errors "service.ports.http, grpc, metrics and openai must be four different ports" -}}
{{- end -}}
{{- if and (hasKey (default dict $v.affinity) "nodeAffinity") $v.gpu.products -}}
{{- $errors = append $errors "set either gpu.products or affinity.nodeAffinity, not both (affinity.nodeAffinity would replace the GPU product rule)" -}}
{{- end -}}
{{- range $name := list "http" "grpc" -}}
{{- $ing := get $v.ingress $name -}}
{{- if and $ing.enabled (not $ing.host) -}}
{{- $errors = append $errors (printf "ingress.%s.enabled=true needs ingress.%s.host" $name $name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.ingress.http.enabled $v.ingress.grpc.enabled (eq $v.ingress.http.host $v.ingress.grpc.host) -}}
{{- $errors = append $errors "ingress.http.host and ingress.grpc.host must differ (gRPC needs its own host)" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nnim-llm: inconsistent values:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
