using System.Text.Json;
using System.Text.Json.Serialization;
using Vmsnap.Cli.Commands;
using Vmsnap.Migration;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Cli;

/// <summary>
/// Every JSON document the commands print, serialised by generated code (no reflection: the command is also a
/// native AOT executable). qemu-img's naming: keys like virtual-size, vm-state-size; enum values like buffered;
/// null values left out.
/// </summary>
[JsonSourceGenerationOptions(
    WriteIndented = true,
    IndentSize = 4,
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    Converters = [typeof(KebabCaseEnumConverter<VmStateWriteMode>), typeof(KebabCaseEnumConverter<MigrationSectionKind>)])]
[JsonSerializable(typeof(QemuImgJson.ImageInfo))]
[JsonSerializable(typeof(QemuImgJson.ImageCheck))]
[JsonSerializable(typeof(ImageCommands.TransferJson))]
[JsonSerializable(typeof(SnapshotCommands.ListJson))]
[JsonSerializable(typeof(SnapshotCommands.ActionJson))]
[JsonSerializable(typeof(VmCommands.ResultJson))]
[JsonSerializable(typeof(VmCommands.StreamLoadJson))]
[JsonSerializable(typeof(VmCommands.InspectJson))]
// InspectJson's source is one of these two (a property of type object: found by its runtime type).
[JsonSerializable(typeof(VmCommands.InspectedSnapshotJson))]
[JsonSerializable(typeof(string))]
[JsonSerializable(typeof(DemoCommand.DemoResult))]
internal sealed partial class CliJson : JsonSerializerContext;

/// <summary>As <see cref="CliJson"/>, with null values written as null rather than left out (the live commands' keys are always there).</summary>
[JsonSourceGenerationOptions(
    WriteIndented = true,
    IndentSize = 4,
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(LiveCommands.SaveVmJson))]
[JsonSerializable(typeof(LiveCommands.LoadVmJson))]
[JsonSerializable(typeof(LiveCommands.RecoverJson))]
[JsonSerializable(typeof(LiveCommands.DomainLoadVmJson))]
[JsonSerializable(typeof(DomainList.DomainListJson))]
internal sealed partial class CliJsonWithNulls : JsonSerializerContext;

/// <summary>Enum values as kebab-case strings (<c>buffered</c>, <c>early-setup</c>).</summary>
internal sealed class KebabCaseEnumConverter<TEnum>() : JsonStringEnumConverter<TEnum>(JsonNamingPolicy.KebabCaseLower)
    where TEnum : struct, Enum;
