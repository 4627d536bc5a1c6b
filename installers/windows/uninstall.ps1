#Requires -Version 5.1
#Requires -RunAsAdministrator
<#
.SYNOPSIS
    Remove everything installers/windows/install.ps1 added.

.DESCRIPTION
    Stops and deletes the hatchway-agent service, removes "$env:ProgramFiles\Hatchway\agent" and its PATH entry,
    the event log source, and "$env:ProgramData\Hatchway" (config with the node credential, models, logs).
    With -KeepConfig the config stays, so a reinstall keeps the node's identity without a new token.
    The node stays listed on the plane until an admin revokes it (`hatchway admin nodes revoke NODE`).
    Running it again, or where the agent was never installed, changes nothing and succeeds.

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File uninstall.ps1
#>
[CmdletBinding()]
param(
    # Keep "$env:ProgramData\Hatchway\agent.json".
    [switch] $KeepConfig
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'

$ServiceName = 'hatchway-agent'
$VendorDir = Join-Path $env:ProgramFiles 'Hatchway'
$InstallDir = Join-Path $VendorDir 'agent'
$DataDir = Join-Path $env:ProgramData 'Hatchway'
$Exe = Join-Path $InstallDir 'hatchway-agent.exe'

# -- the service first: stopped (it drains) and deleted, by the agent that registered it when it is there --------
if (Test-Path -LiteralPath $Exe -PathType Leaf) {
    & $Exe service uninstall
    if ($LASTEXITCODE -ne 0) {
        throw "hatchway-agent service uninstall failed with exit code $LASTEXITCODE"
    }
} elseif ($null -ne (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue)) {
    Stop-Service -Name $ServiceName -ErrorAction SilentlyContinue
    & sc.exe delete $ServiceName | Out-Null
}

if ([System.Diagnostics.EventLog]::SourceExists($ServiceName)) {
    [System.Diagnostics.EventLog]::DeleteEventSource($ServiceName)
}

$machinePath = [Environment]::GetEnvironmentVariable('Path', 'Machine')
$entries = @($machinePath -split ';' | Where-Object { $_ -and $_ -ne $InstallDir })
if ($entries.Count -ne @($machinePath -split ';' | Where-Object { $_ }).Count) {
    [Environment]::SetEnvironmentVariable('Path', ($entries -join ';'), 'Machine')
}

foreach ($folder in @($InstallDir, "$InstallDir.new", "$InstallDir.old")) {
    if (Test-Path -LiteralPath $folder) {
        Remove-Item -LiteralPath $folder -Recurse -Force
    }
}
if ((Test-Path -LiteralPath $VendorDir) -and -not (Get-ChildItem -LiteralPath $VendorDir -Force)) {
    Remove-Item -LiteralPath $VendorDir -Force
}

if (Test-Path -LiteralPath $DataDir) {
    if ($KeepConfig) {
        Get-ChildItem -LiteralPath $DataDir -Force |
            Where-Object { $_.Name -ne 'agent.json' } |
            Remove-Item -Recurse -Force
    } else {
        Remove-Item -LiteralPath $DataDir -Recurse -Force
    }
}
Write-Host 'hatchway-agent is removed.'
