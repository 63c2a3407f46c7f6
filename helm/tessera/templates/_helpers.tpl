{{- define "tessera.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "ingest"). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tessera.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tessera.configSecret" -}}
{{- .Values.existingConfigSecret | default (printf "%s-config" (include "tessera.fullname" .)) -}}
{{- end -}}

{{/* The container every component runs: call with (dict "root" $ "component" "profiles"). */}}
{{- define "tessera.container" -}}
{{- $root := .root -}}
- name: {{ .component }}
  image: {{ include "tessera.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["/usr/local/bin/tessera-{{ .component }}"]
  args: ["--config", "/etc/tessera/config/tessera.toml"]
  env:
    - name: TESSERA_LOG_FORMAT
      value: {{ $root.Values.logFormat | quote }}
    - name: RUST_LOG
      value: {{ $root.Values.logLevel | quote }}
    {{- if .stateful }}
    # Static group membership: a restarted pod takes its partitions back at once.
    - name: TESSERA__KAFKA__GROUP_INSTANCE_ID
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- end }}
    {{- if and (eq .component "profiles") (gt (int $root.Values.profiles.replicas) 1) }}
    {{- $name := printf "%s-profiles" (include "tessera.fullname" $root) }}
    # Every profiles pod's address (the headless Service names each): each answers the
    # API for its partitions and asks these for the rest. Set here, not in tessera.toml,
    # so that a configuration from existingConfigSecret gets it too.
    - name: TESSERA__PROFILES__PEERS
      value: '[{{ range $i, $_ := until (int $root.Values.profiles.replicas) }}{{ if $i }}, {{ end }}"http://{{ $name }}-{{ $i }}.{{ $name }}.{{ $root.Release.Namespace }}.svc:8080"{{ end }}]'
    {{- end }}
  ports:
    - name: http
      containerPort: 8080
      protocol: TCP
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    periodSeconds: 10
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /readyz, port: http}
    periodSeconds: 5
    failureThreshold: 2
  startupProbe:
    httpGet: {path: /healthz, port: http}
    periodSeconds: 2
    failureThreshold: 60
  resources:
    {{- toYaml (index $root.Values .component).resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/tessera/config
      readOnly: true
    - name: definitions
      mountPath: /etc/tessera/definitions
      readOnly: true
    {{- if .stateful }}
    - name: state
      mountPath: /var/lib/tessera
    {{- else if eq .component "ingest" }}
    # The subject keys ingest read: a cache of the keys topic, rebuilt when empty.
    - name: keys
      mountPath: /var/lib/tessera
    {{- end }}
{{- end -}}

{{- define "tessera.podVolumes" -}}
- name: config
  secret:
    secretName: {{ include "tessera.configSecret" . }}
- name: definitions
  configMap:
    name: {{ include "tessera.fullname" . }}-definitions
{{- end -}}
