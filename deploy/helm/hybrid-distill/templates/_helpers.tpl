{{/*
Labels on every object: the kustomize base's (name, component, part-of) plus Helm's
own; tests/deploy/test_helm.py compares the objects modulo Helm's.
*/}}
{{- define "hd.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: hybrid-distill
{{- end -}}

{{/* Labels of an object of one component: (dict "root" $ "component" "teacher"). */}}
{{- define "hd.labels" -}}
{{- with .component }}app.kubernetes.io/component: {{ . }}
{{ end -}}
app.kubernetes.io/name: hybrid-distill
{{ include "hd.helmLabels" .root }}
{{- end -}}

{{/* Pod selector labels of a component. */}}
{{- define "hd.selector" -}}
app.kubernetes.io/component: {{ . }}
app.kubernetes.io/name: hybrid-distill
{{- end -}}

{{- define "hd.image" -}}
{{ printf "%s:%s" .repository .tag }}
{{- end -}}

{{/* The hardened container securityContext every container uses. */}}
{{- define "hd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop:
  - ALL
privileged: false
readOnlyRootFilesystem: true
runAsGroup: 10001
runAsNonRoot: true
runAsUser: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "hd.podSecurityContext" -}}
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
runAsGroup: 10001
runAsNonRoot: true
runAsUser: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Resources with the GPU count added to requests and limits when non-zero. */}}
{{- define "hd.resources" -}}
{{- $gpus := .gpus | int -}}
requests:
  {{- range $k, $v := .resources.requests }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
  {{- if gt $gpus 0 }}
  nvidia.com/gpu: {{ $gpus | quote }}
  {{- end }}
limits:
  {{- range $k, $v := .resources.limits }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
  {{- if gt $gpus 0 }}
  nvidia.com/gpu: {{ $gpus | quote }}
  {{- end }}
{{- end -}}

{{/* Startup probe period; failureThreshold = allowance / period. */}}
{{- define "hd.startupPeriod" -}}10{{- end -}}

{{- define "hd.checkovImageSkip" -}}
checkov.io/skip1: "CKV_K8S_43=Images are pinned by tag: the offline CI that renders these cannot resolve digests; the release pipeline sets digests with `kustomize edit set image`."
{{- end -}}

{{/*
An init container that waits for a fetch Job's marker naming <prefix>_HF_REPO@
<prefix>_HF_REVISION in the directory of <prefix>_MODEL (model-fetch-jobs.yaml).
*/}}
{{- define "hd.waitForModel" -}}
- command:
  - python
  - -c
  - |
    import os, time
    from teacher_service.config import ModelSpec
    path = ModelSpec.parse(os.environ["{{ .prefix }}_MODEL"]).path
    want = f'{os.environ["{{ .prefix }}_HF_REPO"]}@{os.environ["{{ .prefix }}_HF_REVISION"]}'
    marker = path / ".hybrid-distill-fetched"
    while not (marker.exists() and marker.read_text().strip() == want):
        print(f"waiting for job/{{ .job }} to fetch {want} into {path}", flush=True)
        time.sleep(float(os.environ["MODEL_POLL_SECONDS"]))
    print(f"{path} holds {want}")
  env:
  - name: MODEL_POLL_SECONDS
    value: "10"
  envFrom:
  - configMapRef:
      name: {{ .config }}
  image: {{ include "hd.image" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  name: {{ .name }}
  resources:
    limits:
      cpu: 500m
      memory: 512Mi
    requests:
      cpu: 100m
      memory: 256Mi
  securityContext:
    {{- include "hd.containerSecurityContext" .root | nindent 4 }}
  volumeMounts:
  - mountPath: {{ .mount }}
    name: {{ .volume }}
    readOnly: true
  - mountPath: /tmp
    name: tmp
{{- end -}}
