#Requires -Version 5.1
#Requires -RunAsAdministrator
<#
.SYNOPSIS
    Install hatchway-agent on Windows as a service, enrolled with a plane, in one command.

.DESCRIPTION
    Installs the one-folder build under "$env:ProgramFiles\Hatchway\agent" (added to the machine PATH), keeps
    its data under "$env:ProgramData\Hatchway" (config with the node credential, models, logs) readable only by
    SYSTEM, Administrators and the service's own virtual account NT SERVICE\hatchway-agent, enrolls, and
    registers the Windows service that `hatchway-agent service install` describes: delayed automatic start,
    restart on failure, logs in "$env:ProgramData\Hatchway\logs" and the Application event log.

    Running it again upgrades in place: an enrolled node keeps its identity and is not enrolled again unless
    -Reenroll is given. uninstall.ps1 removes everything this script added.

    The build matches the machine: a downloaded package holds one folder per accelerator (hatchway-agent for the
    CPU, hatchway-agent-cuda, hatchway-agent-vulkan), and the installer takes the CUDA one when `nvidia-smi -L`
    lists a GPU on an x64 machine, else the CPU one; -Accel (or HATCHWAY_ACCEL) chooses instead, and -Detect only
    prints what it would choose and why.

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File install.ps1 -From .\hatchway-agent-windows-x86_64.zip `
        -Plane plane.example.com:8443 -Token hwt-... -Model C:\models\llama-3.1-8b.Q4_K_M.gguf=llama-3.1-8b `
        -RunArgs '--slots', '2', '--gpu-layers', '99'
#>
[CmdletBinding()]
param(
    # The hatchway-agent build: its folder, or a .zip holding it (default: the build for this machine's
    # accelerator beside this script, as in a downloaded package).
    [string] $From = '',
    # Which build to install from the package: auto (cuda when `nvidia-smi -L` lists a GPU, else cpu), cpu, cuda
    # or vulkan.
    [string] $Accel = $(if ($env:HATCHWAY_ACCEL) { $env:HATCHWAY_ACCEL } else { 'auto' }),
    # Print the accelerator this machine gets, why, and the build it would install; change nothing.
    [switch] $Detect,
    # The plane's node service, HOST:PORT.
    [string] $Plane = $env:HATCHWAY_PLANE,
    # The enrollment token from `hatchway admin nodes token create`.
    [string] $Token = $env:HATCHWAY_ENROLL_TOKEN,
    # The name this node is listed under (default: the computer name).
    [string] $Name = '',
    # GGUF files to serve, each PATH[=NAME]; copied into the agent's data folder.
    [string[]] $Model = @(),
    # Further options for `hatchway-agent run`, e.g. '--slots', '2'.
    [string[]] $RunArgs = @(),
    # Plain TCP to the plane, for loopback development only.
    [switch] $Insecure,
    # Enroll again even if this machine is enrolled already.
    [switch] $Reenroll,
    # Install the service, but do not start it now (it starts at the next boot).
    [switch] $NoStart
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'

$ServiceName = 'hatchway-agent'
$InstallDir = Join-Path $env:ProgramFiles 'Hatchway\agent'
$DataDir = Join-Path $env:ProgramData 'Hatchway'
$ConfigPath = Join-Path $DataDir 'agent.json'
$ModelsDir = Join-Path $DataDir 'models'
$Exe = Join-Path $InstallDir 'hatchway-agent.exe'

function Invoke-Agent {
    param(
        [Parameter(Mandatory = $true)] [string] $Program,
        [Parameter(Mandatory = $true)] [string[]] $Arguments
    )
    & $Program @Arguments
    if ($LASTEXITCODE -ne 0) {
        throw "hatchway-agent $($Arguments[0]) failed with exit code $LASTEXITCODE (see above)"
    }
}

function Test-Enrolled {
    param([Parameter(Mandatory = $true)] [string] $Program)
    if (-not (Test-Path -LiteralPath $ConfigPath)) {
        return $false
    }
    $output = & $Program status --config $ConfigPath
    if ($LASTEXITCODE -ne 0) {
        return $false
    }
    return [bool](($output -join "`n") | ConvertFrom-Json).enrolled
}

# -- the accelerator: asked for, or what this machine has -----------------------------------------------------------
if (@('auto', 'cpu', 'cuda', 'vulkan') -notcontains $Accel) {
    throw "-Accel ${Accel}: one of auto, cpu, cuda, vulkan"
}
$accelAsked = $Accel -ne 'auto'
if ($accelAsked) {
    $accelWhy = 'asked for with -Accel or HATCHWAY_ACCEL'
} else {
    $Accel = 'cpu'
    # nvidia-smi ships with the driver and reads the GPUs through NVML: one "GPU 0: ..." line each.
    $smi = Get-Command nvidia-smi -ErrorAction SilentlyContinue
    if ($null -eq $smi) {
        $accelWhy = 'no NVIDIA GPU (no nvidia-smi on PATH)'
    } else {
        # Windows PowerShell turns a native command's stderr into errors, which 'Stop' would throw.
        try {
            $gpus = @(& $smi.Source -L 2>$null | Where-Object { $_ -match '^GPU \d' })
            $smiFailed = $LASTEXITCODE -ne 0
        } catch {
            $gpus = @()
            $smiFailed = $true
        }
        if ($smiFailed -or $gpus.Count -eq 0) {
            $accelWhy = 'nvidia-smi is here but lists no GPU (is the NVIDIA driver loaded?)'
        } elseif ($env:PROCESSOR_ARCHITECTURE -ne 'AMD64') {
            $accelWhy = "nvidia-smi lists $($gpus[0]), but the CUDA build is for x64 and this is $env:PROCESSOR_ARCHITECTURE"
        } else {
            $Accel = 'cuda'
            $accelWhy = "nvidia-smi lists $($gpus.Count) NVIDIA GPU(s): $($gpus[0])"
        }
    }
}
Write-Host "Accelerator: $Accel ($accelWhy)."
# A downloaded package holds the builds beside this script: hatchway-agent-<accel>, the CPU one hatchway-agent.
if (-not $From) {
    $From = Join-Path $PSScriptRoot "hatchway-agent-$Accel"
    $cpuBuild = Join-Path $PSScriptRoot 'hatchway-agent'
    if (-not (Test-Path -LiteralPath (Join-Path $From 'hatchway-agent.exe') -PathType Leaf)) {
        $hasCpuBuild = Test-Path -LiteralPath (Join-Path $cpuBuild 'hatchway-agent.exe') -PathType Leaf
        if ($hasCpuBuild -and $Accel -ne 'cpu' -and $accelAsked) {
            throw "-Accel ${Accel}: this package has no $Accel build ($From)"
        }
        if ($hasCpuBuild -and $Accel -ne 'cpu') {
            Write-Host "This package has no $Accel build (hatchway-agent-$Accel): installing the CPU build."
        }
        $From = $cpuBuild
    }
}
if ($Detect) {
    Write-Host "Build: $From."
    return
}
Write-Host "Installing the build from $From."

# -- a running agent holds its files open: stop it first (it drains its running jobs) ----------------------------
$existing = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($null -ne $existing -and $existing.Status -ne 'Stopped') {
    Write-Host "Stopping the running $ServiceName service..."
    Stop-Service -Name $ServiceName
}

# -- the files: copied beside their place, then swapped in ---------------------------------------------------------
$unpacked = $null
if (Test-Path -LiteralPath $From -PathType Container) {
    $source = $From
} elseif (Test-Path -LiteralPath $From -PathType Leaf) {
    $unpacked = Join-Path ([System.IO.Path]::GetTempPath()) ("hatchway-agent-" + [guid]::NewGuid())
    Expand-Archive -LiteralPath $From -DestinationPath $unpacked
    $source = $unpacked
    if (Test-Path -LiteralPath (Join-Path $unpacked 'hatchway-agent') -PathType Container) {
        $source = Join-Path $unpacked 'hatchway-agent'
    }
} else {
    throw "-From ${From}: no such file or folder"
}
if (-not (Test-Path -LiteralPath (Join-Path $source 'hatchway-agent.exe') -PathType Leaf)) {
    throw "$From holds no hatchway-agent build (hatchway-agent.exe)"
}
$staging = "$InstallDir.new"
$previous = "$InstallDir.old"
foreach ($stale in @($staging, $previous)) {
    if (Test-Path -LiteralPath $stale) {
        Remove-Item -LiteralPath $stale -Recurse -Force
    }
}
New-Item -ItemType Directory -Path $staging -Force | Out-Null
Copy-Item -Path (Join-Path $source '*') -Destination $staging -Recurse -Force
if ($null -ne $unpacked) {
    Remove-Item -LiteralPath $unpacked -Recurse -Force
}
# Downloaded files carry the mark of the web, and SmartScreen would stop the service's unsigned executable.
Get-ChildItem -LiteralPath $staging -Recurse -File | Unblock-File
if (Test-Path -LiteralPath $InstallDir) {
    Move-Item -LiteralPath $InstallDir -Destination $previous
}
Move-Item -LiteralPath $staging -Destination $InstallDir
if (Test-Path -LiteralPath $previous) {
    Remove-Item -LiteralPath $previous -Recurse -Force
}

# -- data: SYSTEM and Administrators only until the service's account exists (service install grants it) ---------
New-Item -ItemType Directory -Path $DataDir, $ModelsDir -Force | Out-Null
& icacls $DataDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
if ($LASTEXITCODE -ne 0) {
    throw "icacls could not restrict $DataDir (exit code $LASTEXITCODE)"
}

# -- models: each copied in (unless it is there already), then named on `run`'s command line ----------------------
$serviceArgs = @()
foreach ($spec in $Model) {
    $split = $spec.LastIndexOf('=')
    if ($split -gt 0) {
        $path = $spec.Substring(0, $split)
        $served = $spec.Substring($split + 1)
    } else {
        $path = $spec
        $served = ''
    }
    if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
        throw "-Model ${path}: no such file"
    }
    $destination = Join-Path $ModelsDir (Split-Path -Leaf $path)
    if ((Resolve-Path -LiteralPath $path).Path -ne $destination) {
        Copy-Item -LiteralPath $path -Destination $destination -Force
    }
    if ($served) {
        $serviceArgs += @('--model', "$destination=$served")
    } else {
        $serviceArgs += @('--model', $destination)
    }
}

# -- enrollment: once; a second run keeps the node's identity ------------------------------------------------------
if ($Reenroll -or -not (Test-Enrolled -Program $Exe)) {
    if (-not $Plane) {
        throw "The plane's address is needed: -Plane HOST:PORT (or HATCHWAY_PLANE)"
    }
    if (-not $Token) {
        throw 'An enrollment token is needed: -Token (or HATCHWAY_ENROLL_TOKEN), from the admin'
    }
    $enrollArgs = @('enroll', '--plane', $Plane, '--config', $ConfigPath)
    if ($Name) {
        $enrollArgs += @('--name', $Name)
    }
    if ($Insecure) {
        $enrollArgs += '--insecure'
    }
    # The token goes through the environment, not the command line, which other users can read.
    $env:HATCHWAY_ENROLL_TOKEN = $Token
    try {
        Invoke-Agent -Program $Exe -Arguments $enrollArgs
    } finally {
        Remove-Item Env:HATCHWAY_ENROLL_TOKEN -ErrorAction SilentlyContinue
    }
} else {
    Write-Host "Already enrolled ($ConfigPath): keeping this node's identity (-Reenroll to enroll again)."
}

# -- the event log source, so the Event Viewer shows the agent's messages as they are -----------------------------
if (-not [System.Diagnostics.EventLog]::SourceExists($ServiceName)) {
    [System.Diagnostics.EventLog]::CreateEventSource($ServiceName, 'Application')
}

# -- the service: described by `hatchway-agent service install`, the one place that registers it ----------------
$installArgs = @('service', 'install', '--exec', $Exe, '--config', $ConfigPath)
if ($NoStart) {
    $installArgs += '--no-start'
}
Invoke-Agent -Program $Exe -Arguments ($installArgs + @('--') + $serviceArgs + $RunArgs)

# -- on the PATH, for `hatchway-agent status` in a new terminal ----------------------------------------------------
$machinePath = [Environment]::GetEnvironmentVariable('Path', 'Machine')
if (($machinePath -split ';') -notcontains $InstallDir) {
    [Environment]::SetEnvironmentVariable('Path', "$machinePath;$InstallDir", 'Machine')
}

$nodeId = ((& $Exe status --config $ConfigPath) -join "`n" | ConvertFrom-Json).node_id
Write-Host "hatchway-agent is installed as node $nodeId."
Write-Host "  status: Get-Service $ServiceName    logs: $DataDir\logs\agent.log and the Application event log"
