{{/*
nim-llm.podTemplate: the pod of the Deployment or StatefulSet.
  init container "engine": `nim_build cache-engine` resolves the model into the cache and builds the engine
  there unless the cache holds one for this key (lock + private temp dir + atomic rename), prints its path;
  then `nim_build repo` writes the Triton model repository into /tmp (an emptyDir). With model.store,
  `nim_build repo STORE` chooses the node's profile from the store instead (docs/PROFILES.md).
  container "triton": `nim_build serve` on that repository; the cache is mounted read-only.
*/}}
{{- define "nim-llm.podTemplate" -}}
{{- $ports := .Values.service.ports -}}
{{- $role := default "" .nimRole -}}
metadata:
  labels:
    {{- include "nim-llm.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "nim-llm.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $affinity := deepCopy (default dict .Values.affinity) }}
  {{- if and .Values.gpu.enabled .Values.gpu.products }}
  {{- $match := dict "key" "nvidia.com/gpu.product" "operator" "In" "values" .Values.gpu.products }}
  {{- $terms := list (dict "matchExpressions" (list $match)) }}
  {{- $_ := set $affinity "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" $terms)) }}
  {{- end }}
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ .Values.topologySpread.maxSkew }}
      topologyKey: {{ .Values.topologySpread.topologyKey | quote }}
      whenUnsatisfiable: {{ .Values.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "nim-llm.selectorLabels" . | nindent 10 }}
  {{- end }}
  initContainers:
    - name: engine
      image: {{ include "nim-llm.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["/bin/sh", "-ec"]
      {{- if .Values.model.store }}
      # A model store: the profile for this node (NIM_BUILD_PROFILE, or chosen), built into the store first when it
      # lists the profile build-on-node or has none for this GPU (from the Hugging Face cache in $HF_HUB_CACHE).
      args:
        - |
          store="$NIM_CACHE_DIR/$NIM_STORE"
          if [ ! -f "$store/model_manifest.yaml" ]; then
            echo "Error: no model store at $store (model.store): build one with \`nim_build store MODEL --out DIR\` and copy it onto the volume" >&2
            exit 2
          fi
          rm -rf "$NIM_REPO_DIR"
          nim_build repo "$store" --out "$NIM_REPO_DIR" --profile-goal "$NIM_PROFILE_GOAL"
      {{- else }}
      # The script's arguments ("$@") are the engine values as build flags (templates/_engine.tpl).
      args:
        - |
          engine_dir="$(nim_build cache-engine "$NIM_MODEL" --revision "$NIM_MODEL_REVISION" \
            --cache-dir "$NIM_CACHE_DIR" "$@")"
          rm -rf "$NIM_REPO_DIR"
          nim_build repo "$engine_dir" --out "$NIM_REPO_DIR"
        - nim_build
        {{- include "nim-llm.engineArgs" . | trim | nindent 8 }}
      {{- end }}
      env:
        {{- include "nim-llm.commonEnv" . | nindent 8 }}
        - name: NIM_MODEL
          value: {{ .Values.model.id | quote }}
        - name: NIM_MODEL_REVISION
          value: {{ .Values.model.revision | quote }}
        {{- with .Values.model.store }}
        - name: NIM_STORE
          value: {{ . | quote }}
        - name: NIM_PROFILE_GOAL
          value: {{ $.Values.model.profileGoal | quote }}
        {{- if ne $.Values.model.profile "auto" }}
        - name: NIM_BUILD_PROFILE
          value: {{ $.Values.model.profile | quote }}
        {{- end }}
        - name: HF_HUB_CACHE
          value: {{ printf "%s/hf" $.Values.persistence.mountPath | quote }}
        {{- end }}
        {{- if .Values.huggingface.offline }}
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- end }}
        - name: HF_HUB_DISABLE_TELEMETRY
          value: "1"
        {{- with .Values.huggingface.tokenSecret.name }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . | quote }}
              key: {{ $.Values.huggingface.tokenSecret.key | quote }}
        {{- end }}
      resources:
        {{- include "nim-llm.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .Values.persistence.mountPath | quote }}
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
  containers:
    {{- if eq $role "worker" }}
    - name: mpi-worker
      image: {{ include "nim-llm.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["mpi-worker", "--port", {{ .Values.multiNode.port | quote }}]
      env:
        {{- include "nim-llm.commonEnv" . | nindent 8 }}
        {{- include "nim-llm.mpiEnv" . | nindent 8 }}
      ports:
        - name: mpi
          containerPort: {{ .Values.multiNode.port }}
          protocol: TCP
      readinessProbe:
        tcpSocket:
          port: mpi
        periodSeconds: 10
      resources:
        {{- include "nim-llm.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .Values.persistence.mountPath | quote }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
    {{- else }}
    - name: triton
      image: {{ include "nim-llm.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - $(NIM_REPO_DIR)
        - --http-port
        - {{ $ports.http | quote }}
        - --grpc-port
        - {{ $ports.grpc | quote }}
        - --metrics-port
        - {{ $ports.metrics | quote }}
        - --openai-port
        - {{ $ports.openai | quote }}
        - --host
        - 0.0.0.0
        # serve's own startup limit = the startup probe's budget
        - --startup-timeout
        - {{ mul .Values.startupProbe.periodSeconds .Values.startupProbe.failureThreshold | quote }}
        {{- if eq $role "leader" }}
        # mpirun over the group's pods (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE), ranks through their mpi-worker
        - --mpi-hosts
        - lws
        {{- end }}
      env:
        {{- include "nim-llm.commonEnv" . | nindent 8 }}
        {{- if eq $role "leader" }}
        {{- include "nim-llm.mpiEnv" . | nindent 8 }}
        {{- end }}
        - name: HF_HUB_OFFLINE
          value: "1"
        - name: HF_HUB_DISABLE_TELEMETRY
          value: "1"
      ports:
        - name: http
          containerPort: {{ $ports.http }}
          protocol: TCP
        - name: grpc
          containerPort: {{ $ports.grpc }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $ports.metrics }}
          protocol: TCP
        - name: openai
          containerPort: {{ $ports.openai }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /v2/health/ready
          port: http
        periodSeconds: {{ .Values.startupProbe.periodSeconds }}
        failureThreshold: {{ .Values.startupProbe.failureThreshold }}
        timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
      readinessProbe:  # NIM's: ready while a real generation through the OpenAI API succeeds (Triton's too)
        httpGet:
          path: /v1/health/ready
          port: openai
        periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
        failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
        timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
      livenessProbe:
        httpGet:
          path: /v2/health/live
          port: http
        periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
        failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
        timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
      resources:
        {{- include "nim-llm.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ .Values.persistence.mountPath | quote }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
    {{- end }}
  volumes:
    {{- if not .Values.persistence.enabled }}
    - name: cache
      emptyDir: {}
    {{- else if or .Values.persistence.existingClaim (ne .Values.workload.kind "StatefulSet") }}
    - name: cache
      persistentVolumeClaim:
        claimName: {{ include "nim-llm.claimName" . }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end -}}
